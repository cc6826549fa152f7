"""What the wing's mechanisms cost a step of online work alone: the same online requests on an
engine as `serve --policy online-only` loads it (the step log only) and as `--policy conserve`
loads it (the connector and its worker: layer-wise preemption armed, KV checkpoints kept),
with no offline work, in fresh engine processes alternated `--rounds` times.

A step that holds online work alone is never cut and saves no checkpoint, so its time should
not move; `serve`'s logs show conserve's online prefill steps slower than online-only's, and
this tells the mechanisms' share of that from the rest of a co-served run (offline requests
resident in the engine, the pump, the host). Per engine: the median step time of a 256-token
prefill alone (`--prompts` of them, one request at a time), of one decode, and of 4-8
decodes (`--prompts` requests, then batches of 4 and 8 together).

    python -m benchmarks.online_step_cost          # about 7 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import add_measured_args, measure_host, write_measured

ENGINES = ("online-only", "conserve")
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 16


def run_engine(engine_name: str, num_prompts: int, out: Path) -> None:
    """One engine's requests; its step log's new lines to `out` (run in a fresh process)."""
    from vllm import SamplingParams

    from conserve_bench.config import default_kv_checkpoint_gib
    from conserve_bench.engine.local import start_engine
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig, engine_overrides

    with tempfile.TemporaryDirectory() as work:
        step_log = Path(work) / "steps.jsonl"
        connector = None
        if engine_name == "conserve":  # NOTE: as `serve.server.connector_config` makes it
            connector = ConnectorConfig(layer_preemption=True, checkpoint_gib=default_kv_checkpoint_gib(),
                                        checkpoint_state_path=str(Path(work) / "checkpoints.json"))
        overrides = {**engine_overrides(step_log=step_log, connector=connector),
                     "engine_core_in_process": False}  # NOTE: `serve`'s layout
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]}
                   for _ in range(num_prompts + 12)]
        params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
        with start_engine(resolve_model("smollm2-135m"), **overrides) as engine:
            engine.llm.generate(prompts[-1:], params, use_tqdm=False)  # NOTE: warm-up, not counted
            num_warm = len(step_log.read_text().splitlines())
            for prompt in prompts[:num_prompts]:
                engine.llm.generate([prompt], params, use_tqdm=False)
            for size in (4, 8):
                engine.llm.generate(prompts[num_prompts:num_prompts + size], params, use_tqdm=False)
        out.write_text("\n".join(step_log.read_text().splitlines()[num_warm:]))


def step_times(lines: list[str]) -> dict[str, float]:
    """Median step ms by shape: a lone 256-token prefill, one decode, 4-8 decodes."""
    shapes: dict[str, list[float]] = {"prefill_ms": [], "decode_1_ms": [], "decode_4_8_ms": []}
    for step in map(json.loads, lines):
        prefilled, num_decodes = sum(p[0] for p in step["prefills"]), len(step["decodes"])
        if prefilled == PROMPT_TOKENS and not num_decodes:
            shapes["prefill_ms"].append(step["step_s"] * 1e3)
        elif not prefilled and num_decodes == 1:
            shapes["decode_1_ms"].append(step["step_s"] * 1e3)
        elif not prefilled and 4 <= num_decodes <= 8:
            shapes["decode_4_8_ms"].append(step["step_s"] * 1e3)
    return {shape: statistics.median(times) for shape, times in shapes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Alternations of the two engines.")
    parser.add_argument("--prompts", type=int, default=20, help="Online requests one at a time, per engine.")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # NOTE: one engine's process
    parser.add_argument("--steps-out", help=argparse.SUPPRESS)
    add_measured_args(parser, "online_step_cost")
    args = parser.parse_args()
    if args.engine:
        run_engine(args.engine, args.prompts, Path(args.steps_out))
        return
    host = measure_host(args)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ENGINES}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for name in ENGINES:
                out = Path(work) / f"{name}-{round_}.jsonl"
                subprocess.run([sys.executable, "-m", "benchmarks.online_step_cost", "--engine", name,
                                "--prompts", str(args.prompts), "--steps-out", str(out)],
                               check=True, capture_output=True)
                runs[name].append(step_times(out.read_text().splitlines()))
                print(name, runs[name][-1], flush=True)
    result: dict[str, Any] = {"runs": runs}
    for name in ENGINES:
        result[name] = {shape: statistics.median(r[shape] for r in runs[name]) for shape in runs[name][0]}
    result["ratio"] = {shape: result["conserve"][shape] / result["online-only"][shape]
                       for shape in result["conserve"]}
    write_measured("online_step_cost", result, args, host)


if __name__ == "__main__":  # NOTE: vLLM spawns processes that re-import this file
    main()
