"""An eval's score does not depend on the traffic beside it: `serve` with every mechanism on
at once, as it runs by default, against `submit` alone.

One server of its own: the conserve policy, layer-wise preemption, KV checkpoints in a pool
small enough to evict, vLLM's prefix cache, partial generations, and a KV cache of KV_BLOCKS
blocks, so online requests preempt offline ones. It runs an MMLU job (5-shot, a long subject
and a short one) and a greedy generation job while real online requests arrive over HTTP:
first one at a time (half of them handed to the engine 200 ms late: `serve.handoff_delay_ms`),
then in bursts (a third of the engine's time at most) while the jobs run. Then the same jobs
run by `submit`'s path on the session engine, alone. `benchmarks/score_independence.py` runs the wider matrix (idle,
loaded, preempted; default and deterministic; priority; online-only then drained).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.score_independence import (KEY, LOGPROB_TOLERANCE, OnlineBursts, compare, job_bodies,
                                           run_alone, serve_args, served_results, step_log_counts,
                                           wait_done)
from conserve_bench.faults import ENV_VAR
from conserve_bench.serve.process import ServerProcess
from conserve_bench.vllm_plugin.arrivals import SharedInts

from .conftest import store_profile, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MMLU_LIMIT, GEN_LIMIT = 4, 10
KV_BLOCKS = 32  # 4,096 tokens of 128-token blocks: one long MMLU prompt and a burst fill it
POOL_GIB = 0.1  # about 18 blocks of 5.9 MB: evicts
NUM_ARRIVALS = 6  # one at a time; the last half handed to the engine HANDOFF_DELAY_MS late
HANDOFF_DELAY_MS = 200
# Then bursts that hold online work to a third of the engine's time on any host (a fixed period
# starved the offline work of a host that prefills at half the speed), until the jobs are done
# or MAX_BURSTS have run: each preempts the long MMLU prompts while they run.
BURST_IDLE_FACTOR = 2.0
MAX_BURSTS = 10


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("independence")
    db_url = f"sqlite:///{folder / 'store.db'}"
    store_profile(db_url)
    delay = SharedInts.create(folder / "handoff_delay_ms.bin", 0)
    # NOTE: a share above the 5% default, so that offline work shares steps with online work
    # (mixed steps) often: what a score must not depend on
    args = [*serve_args(db_url, data_dir, folder, kv_blocks=KV_BLOCKS, pool_gib=POOL_GIB), "--max-slowdown", "0.25"]
    with ServerProcess(args, folder, env={ENV_VAR: f"serve.handoff_delay_ms={delay.path}"}) as server:
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        job_ids = [http.post("/v1/jobs", json=body).json()["id"]
                   for body in job_bodies(MMLU_LIMIT, GEN_LIMIT)]
        step_log = folder / "steps.jsonl"
        wait_for(lambda: sum(s["kind"] == "offline" for s in steps(step_log)) >= 3, "offline steps", 300, poll_s=0.5)

        arrivals_from = time.time()
        for i in range(NUM_ARRIVALS):
            delay.write(HANDOFF_DELAY_MS if i >= NUM_ARRIVALS // 2 else 0)
            assert complete(http, max_tokens=2)
            time.sleep(0.5)  # NOTE: offline-only steps run again before the next arrival
        arrivals_to = time.time()
        delay.write(0)
        running = [http.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
        assert any(j["state"] != "done" for j in running), "the jobs ended before the arrivals did"

        bursts = OnlineBursts(server.url, KEY, size=6, period_s=2.5, prompt_words=300, max_tokens=8,
                              idle_factor=BURST_IDLE_FACTOR, max_bursts=MAX_BURSTS)
        bursts.start()
        try:
            wait_done(http, job_ids, timeout_s=400)
        finally:
            bursts.stop()
        metrics = http.get("/metrics").text
        yield {"runs": served_results(http, db_url, job_ids), "steps": steps(step_log),
               "counts": step_log_counts(step_log), "arrivals": (arrivals_from, arrivals_to),
               "metrics": metrics, "bursts": bursts}


def steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def complete(http, max_tokens: int) -> bool:
    answer = http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "The capital of France is",
                                                 "max_tokens": max_tokens, "temperature": 0})
    return answer.status_code == 200


def test_every_arrival_during_offline_steps_cuts_one_step_however_late_its_hand_off(served):
    """Each online request cuts at most one step, and one exactly when it met an offline-only
    step with a safepoint ahead: always when its hand-off takes 200 ms (offline-only steps run
    all that time), and not the steps planned while it is still on its way, nor any after it
    ran. One arriving in a step's last layer group is served when that step ends; one arriving
    when what is left of the step fits in its wait lets the step run out instead of cutting it
    (`policy.run_out_share`): that settles it as a cut does."""
    start, end = served["arrivals"]
    during = [s for s in served["steps"] if start <= s["end_at"] <= end]
    arrived = [i for i, s in enumerate(during) if s.get("online_queue_ms")]  # each one's first step
    assert [len(during[i]["online_queue_ms"]) for i in arrived] == [1] * NUM_ARRIVALS

    def settled(step: dict) -> bool:
        return bool(step.get("aborted") or step.get("run_out_layer") is not None)

    cuts = [s for s in during if settled(s)]
    assert all(s.get("arrival_ns") and s["kind"] == "offline" for s in cuts)
    assert len({s["arrival_ns"] for s in cuts}) == len(cuts)  # no arrival cut two steps
    for n, (begin, first_step) in enumerate(zip([-1, *arrived], arrived)):
        cut = [s for s in during[begin + 1:first_step] if settled(s)]
        queued_ms = during[first_step]["online_queue_ms"][0]
        if n >= NUM_ARRIVALS // 2:  # late hand-off
            assert len(cut) == 1 and queued_ms >= HANDOFF_DELAY_MS, (n, cut, queued_ms)
        else:  # cut, or it came in a step's last layer group (after its last safepoint): no real wait
            last_group_ms = 1e3 * during[first_step - 1]["step_s"] * 0.25 if first_step else 0.0
            assert len(cut) == 1 or queued_ms < 50 + last_group_ms, (n, cut, queued_ms)
    assert len(cuts) >= NUM_ARRIVALS // 2 + 1


def test_scores_under_load_and_preemption_equal_submit_alone(served, engine, data_dir, tmp_path):
    counts = served["counts"]
    # real HTTP arrivals settled offline-only steps, and some cut one: its requests rolled back
    # and were issued again. NOTE: an arrival late in a step lets it run out instead
    # (`policy.run_out_share`), so how many of them cut is the luck of where they land.
    assert counts["arrival_cuts"] + counts["arrival_run_outs"] >= NUM_ARRIVALS, counts
    assert counts["arrival_cuts"] > 0, counts
    assert counts["kv_resumes_loaded"] > 0, counts  # preempted offline requests reloaded KV
    evicted = [line for line in served["metrics"].splitlines()
               if line.startswith('conserve_kv_checkpoint_blocks{kind="evicted"}')]
    assert evicted and float(evicted[0].split()[-1]) > 0, evicted  # the pool was small enough
    assert served["bursts"].sent > 0 and served["bursts"].failed == 0
    assert {"mixed", "offline"} <= {s["kind"] for s in served["steps"]}
    # the default plans offline work against the live P90 of each kind's step time (#36)
    assert all(s["tail_factor"] >= 1.0 for s in served["steps"] if s["kind"] == "mixed")

    alone = run_alone(job_bodies(MMLU_LIMIT, GEN_LIMIT), engine, data_dir, f"sqlite:///{tmp_path / 'alone.db'}")
    difference = compare(served["runs"], alone)
    assert difference["num_requests"] == sum(len(r["items"]) for r in alone) > 40
    assert difference["max_logprob_diff"] <= LOGPROB_TOLERANCE, difference
    assert (difference["is_greedy_flips"], difference["texts_differ"]) == (0, 0), difference
    assert difference["scores_equal"], (served["runs"][0]["metrics"], alone[0]["metrics"])
    assert any(isinstance(i["result"], str) for r in alone for i in r["items"])  # generations compared
