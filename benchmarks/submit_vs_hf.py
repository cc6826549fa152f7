"""Side by side, one run: `conserve-bench submit mmlu` vs lm-eval's own `lm_eval --model hf`.

All 57 MMLU subjects, 5-shot, from the local CSVs, on the same model directory, one command
after the other on an otherwise idle machine. conserve runs exactly what `make demo` runs
(`submit mmlu --limit N --num-fewshot 5 --data-dir DIR`, fresh store); hf runs lm-eval's own
command line (`lm_eval run --model hf --tasks mmlu_local ...`, our task YAML over the same
CSVs, which builds exactly lm-eval's `mmlu` requests), at each batch size of
`--hf-batch-sizes` on the first limit and at the fastest one after that. Reported per limit:
wall time end to end (process start to exit) and of the evaluation alone (model ready to
metrics), items/s, MMLU accuracy, and whether every subject's accuracy is identical. The
host's `profile --quick` figures come first, so absolute times can be compared across hosts.

    python benchmarks/submit_vs_hf.py --limits 2,10            # minutes
    python benchmarks/submit_vs_hf.py --limits 0 --hf-batch-sizes 16   # full MMLU: hours
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUM_CHOICES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="2,10", help="Questions per subject, comma-separated; 0 = all.")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/data/mmlu"))
    parser.add_argument("--hf-batch-sizes", default="4,8,16", help="Tried on the first limit; the fastest is kept.")
    parser.add_argument("--no-profile", action="store_true", help="Skip `profile --quick` (its figures).")
    parser.add_argument("--out", default="results/bench-submit-vs-hf.json")
    parser.add_argument("--hf-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_cli is not None:
        return hf_cli(args.hf_cli)
    report = {"config": vars(args), "host": None if args.no_profile else host_profile(), "runs": []}
    batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    for limit in [int(n) for n in args.limits.split(",")]:
        hf_runs = [run_hf(args, limit, b) for b in batch_sizes]
        best_hf = min(hf_runs, key=lambda r: r["eval_s"])
        batch_sizes = [best_hf["batch_size"]]
        run = {"limit": limit or None, "conserve": run_conserve(args, limit), "hf": best_hf,
               "hf_tried": [{k: r[k] for k in ("batch_size", "eval_s", "total_s")} for r in hf_runs]}
        run["compare"] = compare(run["conserve"], run["hf"])
        report["runs"].append(run)
        _save(report, args.out)
        print(markdown_row(run), flush=True)
    print("\n".join(markdown(report)))


def host_profile() -> dict:
    """This host's `profile --quick` figures (ms): fixed per step, per prefill token, per decode."""
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/profile.db"
        subprocess.run([sys.executable, "-m", "conserve_bench.cli", "profile", "--quick", "--db", db],
                       check=True, capture_output=True)
        from conserve_bench.sched.profiler import show_profile
        from conserve_bench.store import Store

        profile, _ = show_profile(Store(db), "smollm2-135m")
    coefficients = dict(zip(profile.model.to_dict()["features"], profile.model.coefficients))
    return {"device": profile.key.device, **{f"{k}_ms": round(v * 1e3, 3) for k, v in coefficients.items()}}


def run_conserve(args, limit: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "conserve_bench.cli", "submit", "mmlu", "--num-fewshot",
               str(args.num_fewshot), "--data-dir", args.data_dir, "--db", f"sqlite:///{tmp}/c.db",
               "--output", tmp, "--json", *(["--limit", str(limit)] if limit else [])]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        total_s = time.perf_counter() - t0
        results = json.loads((Path(tmp) / f"{json.loads(out.stdout)['id']}.json").read_text())
    meta = results["conserve"]
    return {"total_s": total_s, "eval_s": meta["wall_s"], "num_items": meta["num_items_computed"],
            "store_share": meta["store_share"], "acc": accuracies(results, "mmlu_")}


def run_hf(args, limit: int, batch_size: int) -> dict:
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.tasks import TASKS_DIR

    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        cmd = [sys.executable, __file__, "--hf-cli", "run", "--model", "hf", "--model_args",
               f"pretrained={resolve_model('smollm2-135m').path},dtype=float32", "--device", "cpu",
               "--batch_size", str(batch_size), "--tasks", "mmlu_local", "--num_fewshot",
               str(args.num_fewshot), "--include_path", str(TASKS_DIR), "--metadata",
               json.dumps({"data_dir": args.data_dir}), "--output_path", tmp,
               *(["--limit", str(limit)] if limit else [])]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "TIMINGS": str(timings)})
        total_s = time.perf_counter() - t0
        timed = json.loads(timings.read_text())
        [results_file] = Path(tmp).rglob("results_*.json")
        results = json.loads(results_file.read_text())
    num_items = NUM_CHOICES * sum(n["effective"] for n in results["n-samples"].values())
    return {"batch_size": batch_size, "total_s": total_s, "eval_s": timed["evaluate_s"] - timed["load_s"],
            "num_items": num_items, "acc": accuracies(results, "mmlu_local_")}


def hf_cli(argv: list[str]) -> None:
    """lm-eval's own command line, timed from inside: model load, and the whole evaluation."""
    import lm_eval
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.models.huggingface import HFLM

    timings = {"load_s": 0.0}
    evaluate, init = lm_eval.simple_evaluate, HFLM.__init__

    def timed_init(self, *a, **kw):
        t0 = time.perf_counter()
        init(self, *a, **kw)
        timings["load_s"] += time.perf_counter() - t0

    def timed_evaluate(*a, **kw):
        t0 = time.perf_counter()
        results = evaluate(*a, **kw)
        timings["evaluate_s"] = time.perf_counter() - t0
        return results

    HFLM.__init__, lm_eval.simple_evaluate = timed_init, timed_evaluate
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    Path(os.environ["TIMINGS"]).write_text(json.dumps(timings))


def accuracies(results: dict, prefix: str) -> dict[str, float]:
    """Subject (and group) -> accuracy, named as `mmlu`'s are ("mmlu", "anatomy", "stem"...)."""
    found = {}
    for name, values in results["results"].items():
        if "acc,none" in values:
            subject = name.removeprefix(prefix) if name.startswith(prefix) else name
            found["mmlu" if subject in ("mmlu", "mmlu_local") else subject] = values["acc,none"]
    return found


def compare(conserve: dict, hf: dict) -> dict:
    # NOTE: `mmlu_local` has no category groups (stem, humanities...): compare the names both have
    subjects = sorted(set(conserve["acc"]) & set(hf["acc"]))
    differing = [s for s in subjects if conserve["acc"][s] != hf["acc"][s]]
    return {"end_to_end_x": hf["total_s"] / conserve["total_s"],
            "eval_x": hf["eval_s"] / conserve["eval_s"],
            "num_subjects": len(subjects), "differing": differing,
            "same_items": conserve["num_items"] == hf["num_items"]}


def markdown_header() -> list[str]:
    return ["| questions per subject (items) | conserve end to end s | hf end to end s (batch) | "
            "end to end | conserve eval s (items/s) | hf eval s (items/s) | eval | MMLU acc conserve / hf | "
            "subjects identical |",
            "|---|---|---|---|---|---|---|---|---|"]


def markdown_row(run: dict) -> str:
    c, h, x = run["conserve"], run["hf"], run["compare"]
    same = f"{x['num_subjects'] - len(x['differing'])}/{x['num_subjects']}"
    return (f"| {run['limit'] or 'all'} ({c['num_items']}) | {c['total_s']:.0f} | "
            f"{h['total_s']:.0f} ({h['batch_size']}) | {x['end_to_end_x']:.2f}x | "
            f"{c['eval_s']:.0f} ({c['num_items'] / c['eval_s']:.1f}) | "
            f"{h['eval_s']:.0f} ({h['num_items'] / h['eval_s']:.1f}) | {x['eval_x']:.2f}x | "
            f"{c['acc'].get('mmlu', float('nan')):.4f} / {h['acc'].get('mmlu', float('nan')):.4f} | {same} |")


def markdown(report: dict) -> list[str]:
    lines = []
    if report["host"]:
        host = report["host"]
        lines.append(f"host: {host['device']}; profile --quick: {host['fixed_ms']} ms per step, "
                     f"{host['prefill_tokens_ms']} ms per prefill token, {host['decodes_ms']} ms per decode")
    return lines + markdown_header() + [markdown_row(run) for run in report["runs"]]


def _save(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
