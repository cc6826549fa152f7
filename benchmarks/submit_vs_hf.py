"""Side by side, one run: `conserve-bench submit` vs lm-eval's own `hf` backend.

Same model directory, same questions (local MMLU CSVs), same few-shot setting, run one after
the other on an otherwise idle machine. Reports requests/s of the evaluation phase and of the
whole command (engine start-up included), the accuracy of each (must be equal), and the share
of conserve's wall time spent in the store's bookkeeping.

    python benchmarks/submit_vs_hf.py --data-dir ../shared/data/mmlu --limit 10 --num-fewshot 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TASKS = "mmlu_anatomy,mmlu_high_school_geography,mmlu_marketing,mmlu_astronomy"


def run_conserve(args, workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "conserve_bench.cli", "submit", args.tasks, "--limit", str(args.limit),
           "--num-fewshot", str(args.num_fewshot), "--data-dir", args.data_dir,
           "--db", f"sqlite:///{workdir / 'bench.db'}", "--output", str(workdir), "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    total_s = time.perf_counter() - t0
    job_id = json.loads(out.stdout)["id"]
    results = json.loads((workdir / f"{job_id}.json").read_text())
    meta = results["conserve"]
    return {"total_s": total_s, "eval_s": meta["wall_s"], "num_requests": meta["num_items_computed"],
            "store_share": meta["store_share"], "acc": _accuracies(results)}


def run_hf(args) -> dict:
    """lm-eval's hf backend in a fresh process, timed from model load to metrics."""
    cmd = [sys.executable, __file__, "--hf-worker", "--tasks", args.tasks, "--limit", str(args.limit),
           "--num-fewshot", str(args.num_fewshot), "--data-dir", args.data_dir,
           "--hf-batch-size", str(args.hf_batch_size)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {"total_s": time.perf_counter() - t0, **json.loads(out.stdout.strip().splitlines()[-1])}


def hf_worker(args) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from conserve_bench.engine.models import resolve_model
    from conserve_bench.jobs.taskspec import task_manager

    lm = HFLM(pretrained=resolve_model("smollm2-135m").path, dtype="float32", device="cpu",
              batch_size=args.hf_batch_size)
    tasks = args.tasks.split(",")
    t0 = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                              task_manager=task_manager(args.data_dir), log_samples=False)
    eval_s = time.perf_counter() - t0
    num_requests = 4 * sum(results["n-samples"][t]["effective"] for t in tasks)
    print(json.dumps({"eval_s": eval_s, "num_requests": num_requests, "acc": _accuracies(results)}))


def _accuracies(results: dict) -> dict:
    return {t: v["acc,none"] for t, v in results["results"].items() if "acc,none" in v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/mmlu"))
    parser.add_argument("--hf-batch-size", type=int, default=1)
    parser.add_argument("--out", default="results/bench-submit-vs-hf.json")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        conserve = run_conserve(args, Path(tmp))
    hf = run_hf(args)
    report = {"config": vars(args), "conserve": conserve, "hf": hf, "ratios": _ratios(conserve, hf)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    _print(report)


def _ratios(conserve: dict, hf: dict) -> dict:
    def rps(r, key):
        return r["num_requests"] / r[key]

    return {"eval_rps": rps(conserve, "eval_s") / rps(hf, "eval_s"),
            "end_to_end_rps": rps(conserve, "total_s") / rps(hf, "total_s"),
            "same_accuracy": conserve["acc"] == hf["acc"]}


def _print(report: dict) -> None:
    c, h, r = report["conserve"], report["hf"], report["ratios"]
    print(f"{'':24}{'conserve':>12}{'hf':>12}{'ratio':>8}")
    print(f"{'requests':24}{c['num_requests']:>12}{h['num_requests']:>12}")
    print(f"{'eval requests/s':24}{c['num_requests'] / c['eval_s']:>12.2f}"
          f"{h['num_requests'] / h['eval_s']:>12.2f}{r['eval_rps']:>7.2f}x")
    print(f"{'end-to-end requests/s':24}{c['num_requests'] / c['total_s']:>12.2f}"
          f"{h['num_requests'] / h['total_s']:>12.2f}{r['end_to_end_rps']:>7.2f}x")
    print(f"{'store share of wall':24}{c['store_share']:>12.2%}")
    print(f"accuracy identical: {r['same_accuracy']}  {c['acc']}")


if __name__ == "__main__":
    main()
