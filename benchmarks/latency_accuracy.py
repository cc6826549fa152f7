"""How well the step-latency model predicts steps it was not fitted on, on this machine.

Starts the engine with ConserveScheduler logging every step, runs the profiler's sweep (full
by default), fits on the training shapes and reports the absolute relative error on held-out
shapes (targets: median <= 5%, P90 <= 10%), overall and per kind of step, plus the spread of
the headline numbers over other random splits. A shape measured several times (the profiler
runs its sweep in three rounds) is judged by its median step; the error of every single
held-out step is reported too. Writes benchmarks/measured/latency_accuracy.json (the
steps themselves, for a closer look, to `--samples`).

    python -m benchmarks.latency_accuracy            # full sweep, about 6 minutes on 2 cores
    python -m benchmarks.latency_accuracy --sweep quick --measured /tmp/latency-accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import add_measured_args, measure_host, start_engine, write_measured

TARGET_MEDIAN, TARGET_P90 = 0.05, 0.10
NUM_SPLITS = 10


def step_kind(shape) -> str:
    if any(c.prompt_logprobs for c in shape.prefills):
        return "prompt-logprob prefill"
    if shape.prefills and shape.num_decodes:
        return "mixed prefill + decode"
    return "prefill only" if shape.prefills else "decode only"


def errors_by_kind(model, samples) -> dict[str, dict]:
    from conserve_bench.sched.latency import evaluate_shapes

    kinds = sorted({step_kind(s.shape) for s in samples})
    return {k: asdict(evaluate_shapes(model, [s for s in samples if step_kind(s.shape) == k]))
            for k in kinds}


def split_spread(samples) -> dict[str, list[float]]:
    """Held-out median and P90 over NUM_SPLITS random shape splits (refit each time)."""
    from conserve_bench.profiling.profiler import fit_holdout

    errors = [fit_holdout(samples, seed)[1] for seed in range(NUM_SPLITS)]
    return {"median_rel": [e.median_rel for e in errors], "p90_rel": [e.p90_rel for e in errors]}


def measure(model_name: str, sweep_name: str) -> tuple[object, float]:
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.profiling.profiler import profile_engine, sweep_for

    with tempfile.TemporaryDirectory(prefix="conserve-latency-") as workdir:
        t0 = time.perf_counter()
        with start_engine(resolve_model(model_name), step_log=Path(workdir) / "steps.jsonl") as engine:
            startup_s = time.perf_counter() - t0
            result = profile_engine(engine, sweep_for(sweep_name == "quick", engine.max_model_len))
    return result, startup_s


def report(result, startup_s: float, args, load_before) -> dict:
    from conserve_bench.sched.latency import FEATURES, evaluate
    from conserve_bench.profiling.profiler import (HOLDOUT_FRACTION, fit_holdout,
                                                   split_distinct_shapes)
    from conserve_bench.sched.steplog import to_line

    profile, samples = result.profile, result.sweep.samples
    train, holdout = split_distinct_shapes(samples, HOLDOUT_FRACTION, 0)
    held = set(map(id, holdout))
    error = profile.holdout_error
    # NOTE: the profile's model is fitted on every shape; held-out errors are a training-split fit's
    split_model = fit_holdout(samples, 0)[0]
    return {
        "key": profile.key.to_dict(), "sweep": args.sweep, "startup_s": round(startup_s, 1),
        "sweep_s": round(result.sweep.wall_s, 1), "num_samples": len(samples),
        "num_train": len(train), "num_holdout": len(holdout),
        "coefficients": dict(zip(FEATURES, profile.model.coefficients)),
        "train_error": asdict(result.train_error), "holdout_error": asdict(error),
        "holdout_error_per_step": asdict(evaluate(split_model, holdout)),
        "holdout_by_kind": errors_by_kind(split_model, holdout),
        "holdout_over_splits": split_spread(samples),
        "targets": {"median_rel": TARGET_MEDIAN, "p90_rel": TARGET_P90},
        "met": {"median": error.median_rel <= TARGET_MEDIAN, "p90": error.p90_rel <= TARGET_P90},
        "load_avg_before": load_before, "load_avg_after": list(os.getloadavg()),
        "samples": [{"probe": i, "holdout": id(s) in held, **json.loads(to_line(s))}
                    for i, probe in enumerate(result.sweep.samples_by_probe) for s in probe],
    }


def print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("held-out shapes", "n", "median", "P90", "max",
                  title=f"step-latency model, {out['sweep']} sweep, {out['key']['device']}")
    rows = [("all", out["holdout_error"])] + list(out["holdout_by_kind"].items())
    rows.append(("all, every step on its own", out["holdout_error_per_step"]))
    for name, e in rows:
        table.add_row(name, str(e["num_samples"]), f"{e['median_rel']:.1%}", f"{e['p90_rel']:.1%}",
                      f"{e['max_rel']:.1%}")
    spread = out["holdout_over_splits"]
    console = Console()
    console.print(table)
    console.print(f"targets: median <= {TARGET_MEDIAN:.0%}, P90 <= {TARGET_P90:.0%}; "
                  f"met: {out['met']}; over {NUM_SPLITS} splits: median "
                  f"{min(spread['median_rel']):.1%}..{max(spread['median_rel']):.1%}, P90 "
                  f"{min(spread['p90_rel']):.1%}..{max(spread['p90_rel']):.1%}")
    console.print(f"{out['num_samples']} steps ({out['num_train']} train, {out['num_holdout']} "
                  f"held out); sweep {out['sweep_s']}s, engine start {out['startup_s']}s; "
                  f"load average before {out['load_avg_before'][0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sweep", choices=("full", "quick"), default="full")
    parser.add_argument("--samples", default="results/latency-accuracy-samples.json",
                        help="Where every step measured goes (not committed: thousands of lines).")
    add_measured_args(parser, "latency_accuracy")
    args = parser.parse_args()
    host = measure_host(args)
    load_before = list(os.getloadavg())
    result, startup_s = measure(args.model, args.sweep)
    out = report(result, startup_s, args, load_before)
    samples = out.pop("samples")
    Path(args.samples).parent.mkdir(parents=True, exist_ok=True)
    Path(args.samples).write_text(json.dumps(samples, indent=1) + "\n")
    write_measured("latency_accuracy", out, args, host)
    print_table(out)


if __name__ == "__main__":  # NOTE: vLLM spawns its engine processes, which re-import this file
    main()
