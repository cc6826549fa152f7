"""`bench` and layer-wise preemption, without servers: a policy run twice with different
`serve` flags, and the preemption and online-queue numbers of the report, from step logs."""

from __future__ import annotations

import pytest

from conserve_bench.bench.summary import (PhaseResult, StepRecord, build_report, summarize_online_queue,
                                        summarize_preemptions, summarize_steps)
from conserve_bench.bench.tables import preemption_rows, render_markdown
from conserve_bench.bench.setting import BenchSetting, BenchSettingError, PolicyRun
from conserve_bench.sched.latency import Sample, StepShape

CONFIG = {"ttft_slo_ms": 100.0, "tbt_slo_ms": 50.0, "model": "m", "workload": "w", "offline_tasks": ["mmlu"]}


def test_a_policy_entry_may_carry_its_own_serve_flags():
    assert PolicyRun.parse("conserve") == PolicyRun("conserve", "conserve")
    run = PolicyRun.parse("conserve:--layer-preemption=off --safepoint-every 2")
    assert (run.policy, run.serve_args) == ("conserve", ("--layer-preemption=off", "--safepoint-every", "2"))
    assert run.label == "conserve:--layer-preemption=off --safepoint-every 2"
    assert run.folder == "conserve_--layer-preemption=off_--safepoint-every_2"
    cfg = BenchSetting(trace="t.csv", policies=("conserve", "conserve:--layer-preemption=off"))
    assert [r.label for r in cfg.policy_runs] == ["conserve", "conserve:--layer-preemption=off"]


def test_rounds_alternate_the_entries_and_label_the_later_ones():
    cfg = BenchSetting(trace="t.csv", policies=("online-only", "conserve:--layer-preemption=off"), rounds=2)
    runs = cfg.policy_runs
    assert [r.label for r in runs] == ["online-only", "conserve:--layer-preemption=off",
                                       "online-only#2", "conserve:--layer-preemption=off#2"]
    assert [r.entry for r in runs] == ["online-only", "conserve:--layer-preemption=off"] * 2
    assert runs[3].serve_args == ("--layer-preemption=off",) and len({r.folder for r in runs}) == 4
    for bad, message in ((dict(rounds=0), "--rounds must be >= 1"),
                         (dict(rounds=2, server="http://x", policies=("conserve",)), "not with --server")):
        with pytest.raises(BenchSettingError, match=message):
            BenchSetting(trace="t.csv", **bad)


@pytest.mark.parametrize("policies, message", [
    (("fastest",), "unknown policy 'fastest'"),
    (("conserve:layer-preemption=off",), "after ':' come `serve` flags"),
    (("conserve", "conserve"), "names an entry twice"),
    ((), "--policies is empty"),
])
def test_bad_policy_entries_are_one_line_errors(policies, message):
    with pytest.raises(BenchSettingError, match=message):
        BenchSetting(trace="t.csv", policies=policies)


def test_a_running_server_cannot_take_per_entry_flags():
    with pytest.raises(BenchSettingError, match="with --server"):
        BenchSetting(trace="t.csv", policies=("conserve:--layer-preemption=off",), server="http://x")


def test_step_log_notes_become_step_records():
    sample = Sample(StepShape(decode_context_lens=(10, 12)), 0.25)
    notes = {"end_at": 105.0, "offline_tokens": 2, "aborted": True, "abort_layer": 8,
             "arrival_to_abort_ms": 3.5, "arrival_ns": 77, "layer_group_ms": 9.0, "kind": "offline"}
    record = StepRecord.from_log(sample, notes, started_at=100.0)
    assert record == StepRecord(5.0, 0.25, 2, 2, aborted=True, abort_layer=8,
                                arrival_to_abort_ms=3.5, arrival_ns=77, layer_group_ms=9.0,
                                shape=sample.shape)
    plain = StepRecord.from_log(sample, {"end_at": 101.0, "online_queue_ms": [4.0, 6.0]}, 100.0)
    assert not plain.aborted and plain.online_queue_ms == (4.0, 6.0)
    ran_out = StepRecord.from_log(sample, {"end_at": 102.0, "run_out_layer": 27, "num_layers": 30,
                                           "arrival_to_end_ms": 12.5, "arrival_ns": 78}, 100.0)
    assert (ran_out.aborted, ran_out.run_out_layer, ran_out.arrival_to_end_ms) == (False, 27, 12.5)


STEPS = (
    StepRecord(1.0, 0.5, 256, 256),
    StepRecord(1.1, 0.05, 256, 256, aborted=True, abort_layer=4, arrival_to_abort_ms=2.0,
               arrival_ns=1, layer_group_ms=12.0),
    StepRecord(1.3, 0.2, 300, 0, online_queue_ms=(3.0,)),
    StepRecord(2.0, 0.1, 128, 128, aborted=True, abort_layer=12, arrival_to_abort_ms=10.0,
               arrival_ns=2, layer_group_ms=11.0),
    StepRecord(2.05, 0.01, 128, 128, aborted=True, abort_layer=4, arrival_to_abort_ms=30.0,
               arrival_ns=2, layer_group_ms=10.0),  # cut again: its request not yet scheduled
    StepRecord(2.5, 0.3, 40, 20, online_queue_ms=(1.0, 50.0)),
    StepRecord(3.0, 0.4, 200, 200, run_out_layer=24, arrival_to_end_ms=15.0,
               arrival_ns=4),  # an arrival came at layer 24: it ran out, its tokens kept
    StepRecord(9.0, 0.1, 64, 64, aborted=True, abort_layer=8, arrival_to_abort_ms=1.0,
               arrival_ns=3),  # outside the window
)


def test_preemptions_in_the_window_and_their_discarded_tokens():
    summary = summarize_preemptions(STEPS, window_s=4.0)
    assert (summary["num_preemptions"], summary["num_arrivals"]) == (3, 2)
    # each arrival's first cut only: 2.0 and 10.0 ms (the second cut of arrival 2 waited for
    # the front end's hand-off)
    assert summary["arrival_to_abort_ms"] == {"p50": pytest.approx(6.0), "p99": pytest.approx(9.92)}
    assert summary["layer_group_ms"]["p50"] == pytest.approx(11.0)
    assert summary["abort_layer"] == {"p50": 4.0, "min": 4, "max": 12}
    assert summary["offline_tokens_discarded"] == 256 + 128 + 128
    assert summary["num_run_out"] == 1 and summary["arrival_to_end_ms"] == {"p50": 15.0, "p99": 15.0}
    # a discarded step's tokens are not offline work the engine computed
    computed = summarize_steps(STEPS, window_s=4.0)["offline_computed_tokens_per_s"]
    assert computed == pytest.approx((256 + 0 + 20 + 200) / 4.0)
    assert summarize_preemptions((), 4.0) is None


def test_online_queue_is_per_request_first_scheduled_in_the_window():
    assert summarize_online_queue(STEPS, window_s=4.0) == {"p50": 3.0, "p99": pytest.approx(49.06)}
    assert summarize_online_queue(STEPS[:2], window_s=4.0) == {"p50": None, "p99": None}


def test_report_and_markdown_carry_preemptions_per_policy():
    phases = [PhaseResult("conserve", 4.0, steps=STEPS),
              PhaseResult("conserve:--layer-preemption=off", 4.0, steps=STEPS[:1]),
              PhaseResult("priority", 4.0)]
    report = build_report(CONFIG, PhaseResult("offline-only", 4.0), phases)
    policies = report["policies"]
    assert policies["conserve"]["preemptions"]["num_preemptions"] == 3
    assert policies["conserve:--layer-preemption=off"]["preemptions"]["num_preemptions"] == 0
    assert policies["priority"]["preemptions"] is None and policies["priority"]["online_queue_ms"] is None
    rows = preemption_rows(report)
    assert rows[0] == ("conserve", "3", "6.0/9.9", "11.0/12.0", "4 (4-12)", "512", "1 (15.0/15.0)", "3.0/49.1")
    assert rows[1][:2] == ("conserve:--layer-preemption=off", "0") and rows[1][-2:] == ("0", "-/-")
    assert "| conserve | 3 | 6.0/9.9 |" in render_markdown(report)
