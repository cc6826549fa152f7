"""What the wing costs a step of online work alone: the same online requests on an engine as
`serve --policy online-only` loads it (the step log only), as `--policy conserve` loads its
mechanisms (the connector and its worker: layer-wise preemption armed, KV checkpoints kept),
with no offline work, and as `--policy conserve` loads it whole (the scheduler's policy too,
from this host's profile) with offline requests held in the engine, in fresh engine processes
alternated `--rounds` times.

A step that holds online work alone is never cut and saves no checkpoint, so its time should
not move; `serve`'s logs show conserve's online steps slower than online-only's, and this
tells the mechanisms' share of that, and the held offline requests' (a co-served engine keeps
the MMLU job's requests resident while online work runs: scheduled around, deferred, holding
KV blocks), from the rest of a co-served run (the pump, the API server, the host). Per
engine: the median step time of a 256-token prefill alone (`--prompts` of them, one request
at a time), of one decode, and of 4-8 decodes (`--prompts` requests, then batches of 4 and 8
together), counting steps with no offline token in them.

    python -m benchmarks.online_step_cost          # about 12 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import add_measured_args, host_profile, write_measured

ENGINES = ("online-only", "conserve", "conserve-held")
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 16
# conserve-held: offline requests of an MMLU 5-shot prompt's length, and the steps they run
# (a few chunks, some requests admitted) before the online requests come
NUM_HELD, HELD_PROMPT_TOKENS, HELD_STEPS = 40, 1900, 12
_ONLINE_IDS = itertools.count()  # online request ids, unique in the engine's process


def run_engine(engine_name: str, num_prompts: int, out: Path, db: str) -> None:
    """One engine's requests; its step log's new lines to `out` (run in a fresh process)."""
    with tempfile.TemporaryDirectory() as work:
        step_log = Path(work) / "steps.jsonl"
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)] for _ in range(num_prompts + 12)]
        with _engine(engine_name, Path(work), step_log, db) as engine:
            llm = engine.llm.llm_engine
            if engine_name == "conserve-held":
                _hold_offline(llm, rng)
            _generate(llm, prompts[-1:])  # NOTE: warm-up, not counted
            num_warm = len(step_log.read_text().splitlines())
            for prompt in prompts[:num_prompts]:
                _generate(llm, [prompt])
            for size in (4, 8):
                _generate(llm, prompts[num_prompts:num_prompts + size])
        out.write_text("\n".join(step_log.read_text().splitlines()[num_warm:]))


def _engine(engine_name: str, work: Path, step_log: Path, db: str):
    """The engine as `serve` would load it under the engine's policy (see the module docstring),
    in `serve`'s layout: the engine core in a process of its own."""
    from conserve_bench.config import DEFAULT_MODEL, default_kv_checkpoint_gib
    from conserve_bench.engine.local import Engine, engine_config, start_engine
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig, engine_overrides

    if engine_name == "conserve-held":
        from conserve_bench.serve.server import ServeConfig, load_or_measure_profile, resolve_targets, with_plugins

        cfg = ServeConfig(db_url=db, policy="conserve", warm_start=False, step_log=str(step_log))
        engine_cfg = engine_config(resolve_model(cfg.model), cfg.model_options, scheduling_policy="priority",
                                   engine_core_in_process=False)
        profile = load_or_measure_profile(cfg, engine_cfg)
        targets = resolve_targets(cfg, profile, engine_cfg.max_num_batched_tokens)
        return Engine(with_plugins(engine_cfg, cfg, profile, targets, None, str(work / "refit.json"),
                                   str(work / "checkpoints.json")))
    connector = None
    if engine_name == "conserve":  # NOTE: as `serve.server.connector_config` makes it
        connector = ConnectorConfig(layer_preemption=True, checkpoint_gib=default_kv_checkpoint_gib(),
                                    checkpoint_state_path=str(work / "checkpoints.json"))
    return start_engine(resolve_model(DEFAULT_MODEL), **engine_overrides(step_log=step_log, connector=connector),
                        engine_core_in_process=False)


def _hold_offline(llm, rng: random.Random) -> None:
    """Offline requests into the engine, and a few steps of them: the online requests then
    find them resident (some admitted, part computed), as a co-served engine's are."""
    from vllm import SamplingParams

    from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY

    for i in range(NUM_HELD):
        prompt = [rng.randrange(1000, 40000) for _ in range(HELD_PROMPT_TOKENS)]
        llm.add_request(f"held-{i}", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1),
                        priority=OFFLINE_PRIORITY)
    for _ in range(HELD_STEPS):
        llm.step()


def _generate(llm, prompts: list[list[int]]) -> None:
    """Online requests, stepped until they all finish (held offline requests stay held but for
    what the policy fits beside them). NOTE: in `serve`'s layout the engine core steps on its
    own: between two requests here it may run an offline-only step, as a co-served engine does
    between online requests; `step_times` leaves such steps out."""
    from vllm import SamplingParams

    from conserve_bench.vllm_plugin.overrides import ONLINE_PRIORITY

    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    pending = set()
    for prompt in prompts:
        request_id = f"online-{next(_ONLINE_IDS)}"
        llm.add_request(request_id, {"prompt_token_ids": prompt}, params, priority=ONLINE_PRIORITY)
        pending.add(request_id)
    while pending:
        pending -= {o.request_id for o in llm.step() if o.finished}



def step_times(lines: list[str]) -> dict[str, float]:
    """Median step ms by shape: a lone 256-token prefill, one decode, 4-8 decodes."""
    shapes: dict[str, list[float]] = {"prefill_ms": [], "decode_1_ms": [], "decode_4_8_ms": []}
    for step in map(json.loads, lines):
        prefilled, num_decodes = sum(p[0] for p in step["prefills"]), len(step["decodes"])
        if step.get("offline_tokens"):
            continue  # NOTE: conserve-held's policy may fit offline tokens beside online work
        if prefilled == PROMPT_TOKENS and not num_decodes:
            shapes["prefill_ms"].append(step["step_s"] * 1e3)
        elif not prefilled and num_decodes == 1:
            shapes["decode_1_ms"].append(step["step_s"] * 1e3)
        elif not prefilled and 4 <= num_decodes <= 8:
            shapes["decode_4_8_ms"].append(step["step_s"] * 1e3)
    return {shape: statistics.median(times) for shape, times in shapes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Alternations of the engines.")
    parser.add_argument("--prompts", type=int, default=20, help="Online requests one at a time, per engine.")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # NOTE: one engine's process
    parser.add_argument("--steps-out", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    add_measured_args(parser, "online_step_cost")
    args = parser.parse_args()
    if args.engine:
        run_engine(args.engine, args.prompts, Path(args.steps_out), args.db)
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ENGINES}
    with tempfile.TemporaryDirectory() as work:
        db = f"sqlite:///{work}/profile.db"  # NOTE: the profile conserve-held's policy plans with
        host = host_profile(db, measure=not args.no_profile)
        for round_ in range(args.rounds):
            for name in ENGINES[round_ % len(ENGINES):] + ENGINES[:round_ % len(ENGINES)]:
                out = Path(work) / f"{name}-{round_}.jsonl"
                subprocess.run([sys.executable, "-m", "benchmarks.online_step_cost", "--engine", name,
                                "--prompts", str(args.prompts), "--steps-out", str(out), "--db", db],
                               check=True, capture_output=True)
                runs[name].append(step_times(out.read_text().splitlines()))
                print(name, runs[name][-1], flush=True)
    result: dict[str, Any] = {"runs": runs, "num_held": NUM_HELD}
    for name in ENGINES:
        result[name] = {shape: statistics.median(r[shape] for r in runs[name]) for shape in runs[name][0]}
    for key, name in (("ratio", "conserve"), ("held_ratio", "conserve-held")):
        result[key] = {shape: result[name][shape] / result["online-only"][shape] for shape in result[name]}
    write_measured("online_step_cost", result, args, host)


if __name__ == "__main__":  # NOTE: vLLM spawns processes that re-import this file
    main()
