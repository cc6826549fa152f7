"""Layer-wise preemption on this machine: what armed safepoints cost, how fast an arrival cuts.

1. Overhead, side by side: two engines with the same scheduler (ConserveScheduler), one with
   ConserveConnector loaded; its steps are all armed (the requests are offline) but no arrival
   is ever announced. The same offline workload runs on each in alternating rounds; offline
   tokens/s of each (target: armed >= 98% of plain).
2. Arrival to abort: on the armed engine, long offline prefills while a thread announces the
   arrival signal at random moments. For each arrival, the time until the step it cut stopped
   at a safepoint, against the time of one layer group (target: p99 <= layer group p99 + 5 ms).
   Outputs equal those of the uninterrupted run. Writes benchmarks/measured/layer_preemption.json.

    python -m benchmarks.layer_preemption          # about 6 minutes on 2 idle cores, profile included
    python -m benchmarks.layer_preemption --rounds 1 --num-prompts 8 --arrivals 5 \
        --no-profile --measured /tmp/layer-preemption.json                          # a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import add_measured_args, measure_host, start_engine, write_measured

TARGET_OVERHEAD = 0.02  # armed safepoints may cost at most 2% of offline tokens/s
TARGET_SLACK_MS = 5.0  # arrival to abort within one layer group + 5 ms


def prompts(seed: int, num: int, num_tokens: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40_000) for _ in range(num_tokens)] for _ in range(num)]


def run_offline(engine, batch, **sampling) -> tuple[list, float]:
    """(finished outputs in order, wall seconds) of `batch` at offline priority."""
    from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY

    llm_engine, done = engine.llm.llm_engine, {}
    t0 = time.perf_counter()
    request_ids = engine.submit_tokens(batch, priority=OFFLINE_PRIORITY, **sampling)
    while llm_engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in llm_engine.step() if o.finished)
    return [done[r] for r in request_ids], time.perf_counter() - t0


def start(model, folder: Path, name: str, max_num_batched_tokens: int, connector=None):
    return start_engine(model, step_log=folder / f"{name}-steps.jsonl", connector=connector,
                        max_num_batched_tokens=max_num_batched_tokens)


def alternating_rates(engines: dict, args) -> dict[str, list[float]]:
    """Offline tokens/s per engine over alternating rounds of the same workload
    (`args.rounds` rounds of `args.num_prompts` x `args.prompt_tokens` + `args.max_tokens`)."""
    sampling = dict(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for round_index in range(args.rounds):
        batch = prompts(round_index, args.num_prompts, args.prompt_tokens)
        num_tokens = len(batch) * (args.prompt_tokens + args.max_tokens)
        order = list(engines.items())  # NOTE: alternate who goes first: the load drifts
        for name, engine in order[::-1] if round_index % 2 else order:
            assert engine.llm.reset_prefix_cache()
            _, wall_s = run_offline(engine, batch, **sampling)
            rates[name].append(num_tokens / wall_s)
    return rates


def overhead(engines: dict, args) -> dict:
    """Offline tokens/s per engine over alternating rounds of the same workload."""
    rates = alternating_rates(engines, args)
    plain, armed = (statistics.median(rates[n]) for n in ("plain", "armed"))
    return {"tokens_per_s": rates, "plain_median": plain, "armed_median": armed,
            "overhead": 1 - armed / plain, "target": TARGET_OVERHEAD,
            "met": 1 - armed / plain <= TARGET_OVERHEAD}


def arrivals(engine, signal, step_log: Path, args) -> dict:
    """Cut long offline prefills with arrivals announced from another thread (no request
    follows them: each cuts one step; `tests/test_score_independence.py` cuts with real HTTP
    requests through `serve`)."""
    from conserve_bench.bench.summary import StepRecord, summarize_preemptions
    from conserve_bench.sched.steplog import read_step_log_with_notes

    batch = prompts(10_000, args.num_long, args.long_tokens)
    score = dict(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    assert engine.llm.reset_prefix_cache()
    baseline, _ = run_offline(engine, batch, **score)
    assert engine.llm.reset_prefix_cache()
    first_line = len(read_step_log_with_notes(step_log))
    stop = threading.Event()

    def announce_at_random_moments():
        rng = random.Random(1)
        for _ in range(args.arrivals):
            if stop.wait(rng.uniform(0.3, 0.9)):
                return
            signal.announce()

    thread = threading.Thread(target=announce_at_random_moments, daemon=True)
    t0 = time.time()
    thread.start()
    cut = []
    while thread.is_alive():  # NOTE: keep offline prefills running until every arrival is announced
        outputs, _ = run_offline(engine, batch, **score)
        cut += outputs
        assert engine.llm.reset_prefix_cache()
    stop.set()
    steps = [StepRecord.from_log(s, n, t0) for s, n in read_step_log_with_notes(step_log)[first_line:]]
    window_s = max(s.end_s for s in steps) + 1
    summary = summarize_preemptions(tuple(steps), window_s)
    same = all(_close(a, baseline[i % len(baseline)]) for i, a in enumerate(cut))
    to_abort, group = summary["arrival_to_abort_ms"], summary["layer_group_ms"]
    complete = [s for s in steps if not s.aborted]
    return {**summary, "num_steps": len(steps), "outputs_equal_uninterrupted": same,
            "complete_step_ms_p50": statistics.median(s.step_s * 1e3 for s in complete) if complete else None,
            "target_ms": None if group["p99"] is None else group["p99"] + TARGET_SLACK_MS,
            "met": to_abort["p99"] is not None and to_abort["p99"] <= group["p99"] + TARGET_SLACK_MS}


def _close(a, b, tolerance: float = 1e-3) -> bool:
    """Every prompt logprob of `a` within `tolerance` of `b`'s (both must have them all)."""
    if not (a.prompt_logprobs and b.prompt_logprobs and len(a.prompt_logprobs) == len(b.prompt_logprobs)):
        return False
    for got, want in zip(a.prompt_logprobs, b.prompt_logprobs):
        if (got is None) != (want is None):
            return False
        for token, logprob in (want or {}).items():
            if abs(got[token].logprob - logprob.logprob) >= tolerance:
                return False
    return True


def print_summary(out: dict) -> None:
    o, a = out["overhead"], out["arrivals"]
    print(f"offline tokens/s, median of {len(o['tokens_per_s']['plain'])} rounds: plain "
          f"{o['plain_median']:.1f}, armed {o['armed_median']:.1f}: overhead {o['overhead']:.2%} "
          f"(target <= {TARGET_OVERHEAD:.0%}: {'met' if o['met'] else 'NOT met'})")
    print(f"arrivals: {a['num_arrivals']} cut a step ({a['num_preemptions']} steps cut in all); "
          f"arrival to abort p50/p99 {a['arrival_to_abort_ms']['p50']}/{a['arrival_to_abort_ms']['p99']} ms; "
          f"layer group p50/p99 {a['layer_group_ms']['p50']}/{a['layer_group_ms']['p99']} ms; "
          f"target p99 <= {a['target_ms']} ms: {'met' if a['met'] else 'NOT met'}; "
          f"outputs equal the uninterrupted run: {a['outputs_equal_uninterrupted']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="per step, both engines (about the offline step under conserve)")
    parser.add_argument("--num-long", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=1536)
    parser.add_argument("--arrivals", type=int, default=30)
    parser.add_argument("--safepoint-every", type=int, default=4)
    add_measured_args(parser, "layer_preemption")
    args = parser.parse_args()

    from conserve_bench.engine.models import resolve_model
    from conserve_bench.vllm_plugin.arrivals import ArrivalSignal
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig

    model = resolve_model(args.model)
    host = measure_host(args)
    load_before = list(os.getloadavg())
    signal = ArrivalSignal.create_temporary()
    connector = ConnectorConfig(safepoint_every=args.safepoint_every, arrival_path=str(signal.path))
    try:
        with tempfile.TemporaryDirectory(prefix="conserve-preemption-") as workdir:
            folder = Path(workdir)
            with start(model, folder, "plain", args.max_num_batched_tokens) as plain, \
                    start(model, folder, "armed", args.max_num_batched_tokens, connector) as armed:
                engines = {"plain": plain, "armed": armed}
                out = {"load_avg_before": load_before,
                       "overhead": overhead(engines, args),
                       "arrivals": arrivals(armed, signal, folder / "armed-steps.jsonl", args),
                       "load_avg_after": list(os.getloadavg())}
    finally:
        signal.remove()
    write_measured("layer_preemption", out, args, host)
    print_summary(out)


if __name__ == "__main__":  # NOTE: vLLM spawns its engine processes, which re-import this file
    main()
