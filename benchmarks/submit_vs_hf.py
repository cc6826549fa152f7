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
Writes benchmarks/measured/submit_vs_hf.json (after each limit).

    python -m benchmarks.submit_vs_hf --limits 2,10                          # minutes
    python -m benchmarks.submit_vs_hf --limits 0 --hf-batch-sizes 4 --shards 16   # full MMLU: hours

The full test set takes longer than a machine may be kept (hf alone: 6 hours on 2 cores), so
`--shards N` runs it as N side-by-side runs, shard k holding every N-th question of every
subject from the k-th on (the few-shot examples unchanged, so each question's prompt is the
full run's). Each finished shard's report is kept in `--shards-dir` (tracked in git: it
outlives the machine); a rerun runs the shards still missing (`--table-only`: none) and
prints one row per shard (with its host's profile) and the shards so far combined: times
summed, every start-up counted, accuracy from each subject's questions answered right. A
shard also compares the arms request by request (`compare_requests`: conserve's store against
hf's request cache). A shard stopped before both arms finish is run again whole. Shards
kept from another `--num-fewshot` are refused, not combined.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import MEASURED_DIR, REPO, add_measured_args, host_line, host_profile, write_measured

NUM_CHOICES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="2,10", help="Questions per subject, comma-separated; 0 = all.")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/data/mmlu"))
    parser.add_argument("--hf-batch-sizes", default="4,8,16", help="Tried on the first limit; the fastest is kept.")
    add_measured_args(parser, "submit_vs_hf")
    parser.add_argument("--shards", type=int, help="Run the full test set (--limits 0) as N shards; rerun to continue.")
    parser.add_argument("--shards-dir", default=str(MEASURED_DIR / "full-mmlu"),
                        help="Where each finished shard's report is kept.")
    parser.add_argument("--table-only", action="store_true", help="With --shards: the kept shards' table; run none.")
    parser.add_argument("--hf-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_cli is not None:
        return hf_cli(args.hf_cli)
    batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    if args.shards is not None:
        if args.shards < 1:
            parser.error("--shards must be at least 1")
        if args.limits != "0" or len(batch_sizes) > 1:
            parser.error("--shards runs the full test set (--limits 0) at one hf batch size")
        return run_shards(args, batch_sizes[0])
    host = None if args.no_profile else host_profile()
    report = {"runs": []}
    for limit in [int(n) for n in args.limits.split(",")]:
        hf_runs = []
        for batch_size in batch_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                hf_runs.append(run_hf(args, limit, batch_size, args.data_dir, tmp))
        best_hf = min(hf_runs, key=lambda r: r["eval_s"])
        batch_sizes = [best_hf["batch_size"]]
        with tempfile.TemporaryDirectory() as tmp:
            conserve = run_conserve(args, limit, args.data_dir, tmp)
        run = {"limit": limit or None, "conserve": conserve, "hf": best_hf,
               "hf_tried": [{k: r[k] for k in ("batch_size", "eval_s", "total_s")} for r in hf_runs]}
        run["compare"] = compare(run["conserve"], run["hf"])
        report["runs"].append(run)
        write_measured("submit_vs_hf", report, args, host)
        print(markdown_row(run), flush=True)
    print("\n".join([host_line(host), *markdown(report["runs"])]))


def run_shards(args, batch_size: int) -> None:
    """The full test set as `args.shards` side-by-side runs, each of every N-th question of
    every subject (`write_shard`), each kept in `args.shards_dir` once both arms are done."""
    shards_dir = Path(args.shards_dir)
    shards = load_shards(shards_dir, args.shards, args.num_fewshot)  # before hours of work: can they combine?
    if not args.table_only:
        run_missing_shards(args, batch_size, shards_dir)
        shards = load_shards(shards_dir, args.shards, args.num_fewshot)
    print("\n".join(shards_markdown(shards, args.shards)))


def run_missing_shards(args, batch_size: int, shards_dir: Path) -> None:
    shards_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: SIGTERM ends the shard under way (discarded) and removes its temporary files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped; rerun to continue"))
    host = None
    for shard in range(args.shards):
        path = shards_dir / f"shard-{shard:02d}-of-{args.shards:02d}.json"
        if path.exists():
            continue
        host = host or (None if args.no_profile else host_profile())
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = write_shard(Path(args.data_dir), Path(tmp) / "mmlu", shard, args.shards)
            conserve = run_conserve(args, 0, data_dir, tmp)
            hf = run_hf(args, 0, batch_size, data_dir, tmp, use_cache=True)
            run = {"label": f"shard {shard + 1}/{args.shards}", "conserve": conserve, "hf": hf,
                   "compare": compare(conserve, hf),
                   "requests": compare_requests(f"sqlite:///{tmp}/conserve.db", Path(tmp) / "hf-cache_rank0.db")}
        _save({"date": time.strftime("%Y-%m-%d %H:%M"), "host": host, "num_fewshot": args.num_fewshot, **run}, path)
        print(markdown_row(run), flush=True)


def write_shard(data_dir: Path, out: Path, shard: int, num_shards: int) -> str:
    """An MMLU folder (`out`) with every `num_shards`-th test question of each subject, from
    the `shard`-th on; the dev and val splits (the few-shot examples) linked whole, so every
    question's prompt is the one the full test set gives it."""
    (out / "test").mkdir(parents=True)
    for split in ("dev", "val"):
        (out / split).symlink_to((data_dir / split).resolve())
    for file in sorted((data_dir / "test").glob("*_test.csv")):
        with open(file, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        with open(out / "test" / file.name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows[shard::num_shards])
    return str(out)


def load_shards(shards_dir: Path, num_shards: int, num_fewshot: int) -> list[dict]:
    """The kept shards of an N-shard run; all of them `num_fewshot`-shot, or they are not one run."""
    shards = []
    for path in sorted(shards_dir.glob(f"shard-*-of-{num_shards:02d}.json")):
        shard = json.loads(path.read_text())
        if (found := shard.get("num_fewshot")) != num_fewshot:
            sys.exit(f"{path} was run {found}-shot, not {num_fewshot}-shot: "
                     f"give --num-fewshot {found} or another --shards-dir")
        shards.append(shard)
    return shards


def combine(shards: list[dict]) -> dict:
    """The shards as one run: times and items summed, accuracies from the questions each
    subject answered right in every shard (lm-eval's MMLU group: weighted by size)."""
    run = {}
    for arm in ("conserve", "hf"):
        runs = [s[arm] for s in shards]
        num, right = Counter(), Counter()
        for r in runs:
            for subject, n in r["n"].items():
                num[subject] += n
                right[subject] += round(r["acc"][subject] * n)
        acc = {s: right[s] / num[s] for s in num} | {"mmlu": sum(right.values()) / sum(num.values())}
        run[arm] = {"batch_size": runs[0].get("batch_size"), "n": dict(num), "acc": acc,
                    **{k: sum(r[k] for r in runs) for k in ("total_s", "eval_s", "num_items")}}
    run["compare"] = compare(run["conserve"], run["hf"])
    requests = [s["requests"] for s in shards]
    run["requests"] = {"num_compared": sum(r["num_compared"] for r in requests),
                       "max_abs_diff": max(r["max_abs_diff"] for r in requests),
                       "median_abs_diff": max(r["median_abs_diff"] for r in requests),
                       **{k: sum(r[k] for r in requests) for k in ("num_is_greedy_differ", "num_near_ties")}}
    return run


def shards_markdown(shards: list[dict], num_shards: int) -> list[str]:
    """A row per shard, with when and on what host (its `profile --quick`: ms fixed per step,
    per prefill token, per decode), then the shards combined."""
    header, rule = markdown_header()
    lines = [header + " run; profile --quick ms |", rule + "---|"]
    for shard in shards:
        host = shard["host"] or {}
        profile = " / ".join(str(host.get(k, "?")) for k in ("fixed_ms", "prefill_tokens_ms", "decodes_ms"))
        lines.append(markdown_row(shard) + f" {shard['date']}; {profile} |")
    if shards:
        total = {"label": f"{len(shards)} of {num_shards} shards", **combine(shards)}
        lines += [markdown_row(total) + " |", request_line(total["requests"])]
    return lines


def run_conserve(args, limit: int, data_dir: str, workdir: str) -> dict:
    cmd = conserve_command(args, limit, data_dir, f"sqlite:///{workdir}/conserve.db", workdir)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    total_s = time.perf_counter() - t0
    job_id = json.loads(out.stdout)["conserve"]["job"]["id"]  # `--json`: lm-eval's results object
    results = json.loads((Path(workdir) / f"{job_id}.json").read_text())
    return conserve_result(results, total_s, results["conserve"]["wall_s"])


def conserve_command(args, limit: int, data_dir: str, db: str, output) -> list[str]:
    return [sys.executable, "-m", "conserve_bench.cli", "submit", "mmlu", "--num-fewshot",
            str(args.num_fewshot), "--data-dir", data_dir, "--db", db,
            "--output", str(output), "--json", *(["--limit", str(limit)] if limit else [])]


def conserve_result(results: dict, total_s: float, eval_s: float) -> dict:
    meta = results["conserve"]
    return {"total_s": total_s, "eval_s": eval_s, "num_items": meta["num_items"],
            "store_share": meta["store_share"], "acc": accuracies(results, "mmlu_"),
            "n": num_questions(results, "mmlu_")}


def run_hf(args, limit: int, batch_size: int, data_dir: str, workdir: str, use_cache: bool = False) -> dict:
    """`lm_eval --model hf` on `data_dir`; with `use_cache`, its answers stay in `workdir`'s
    request cache (hf-cache_rank0.db) for `compare_requests`."""
    timings = Path(workdir) / "timings.json"
    cmd = hf_command(args, limit, batch_size, data_dir, Path(workdir) / "hf")
    t0 = time.perf_counter()
    subprocess.run(cmd + (["--use_cache", f"{workdir}/hf-cache"] if use_cache else []), check=True,
                   capture_output=True, env={**os.environ, "TIMINGS": str(timings)})
    end = time.time()
    return hf_result(Path(workdir) / "hf", batch_size, time.perf_counter() - t0,
                     end - json.loads(timings.read_text())["ready_at"])


def hf_command(args, limit: int, batch_size: int, data_dir: str, output) -> list[str]:
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.tasks import TASKS_DIR

    return [sys.executable, "-m", "benchmarks.submit_vs_hf", "--hf-cli", "run", "--model", "hf", "--model_args",
            f"pretrained={resolve_model('smollm2-135m').path},dtype=float32", "--device", "cpu",
            "--batch_size", str(batch_size), "--tasks", "mmlu_local", "--num_fewshot",
            str(args.num_fewshot), "--include_path", str(TASKS_DIR), "--metadata",
            json.dumps({"data_dir": data_dir}), "--output_path", str(output),
            *(["--limit", str(limit)] if limit else [])]


def hf_result(output: Path, batch_size: int, total_s: float, eval_s: float) -> dict:
    [results_file] = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    num = num_questions(results, "mmlu_local_")
    return {"batch_size": batch_size, "total_s": total_s, "eval_s": eval_s,
            "num_items": NUM_CHOICES * sum(num.values()), "acc": accuracies(results, "mmlu_local_"), "n": num}


def hf_cli(argv: list[str]) -> None:
    """lm-eval's own command line; writes the time its model was ready to $TIMINGS (the
    evaluation alone runs from there: task building, requests, metrics)."""
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.models.huggingface import HFLM

    init = HFLM.__init__

    def timed_init(self, *a, **kw):
        init(self, *a, **kw)
        Path(os.environ["TIMINGS"]).write_text(json.dumps({"ready_at": time.time()}))

    HFLM.__init__ = timed_init
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def accuracies(results: dict, prefix: str) -> dict[str, float]:
    """Subject (and group) -> accuracy, named as `mmlu`'s are ("mmlu", "anatomy", "stem"...)."""
    found = {}
    for name, values in results["results"].items():
        if "acc,none" in values:
            subject = name.removeprefix(prefix) if name.startswith(prefix) else name
            found["mmlu" if subject in ("mmlu", "mmlu_local") else subject] = values["acc,none"]
    return found


def num_questions(results: dict, prefix: str) -> dict[str, int]:
    """Subject -> questions evaluated (lm-eval's `n-samples`), named as `accuracies` names them."""
    return {name.removeprefix(prefix): n["effective"] for name, n in results["n-samples"].items()}


def compare(conserve: dict, hf: dict) -> dict:
    # NOTE: `mmlu_local` has no category groups (stem, humanities...): compare the names both have
    subjects = sorted(set(conserve["acc"]) & set(hf["acc"]))
    differing = [s for s in subjects if conserve["acc"][s] != hf["acc"][s]]
    return {"end_to_end_x": hf["total_s"] / conserve["total_s"],
            "eval_x": hf["eval_s"] / conserve["eval_s"],
            "num_subjects": len(subjects), "differing": differing,
            "same_items": conserve["num_items"] == hf["num_items"]}


def compare_requests(conserve_db: str, hf_cache: Path) -> dict:
    """Every request both arms answered, one by one: conserve's stored loglikelihood and
    `is_greedy` against what lm-eval's request cache (`--use_cache`) holds for hf, found by
    lm-eval's own cache key. `num_near_ties`: questions whose two best choices are closer, in
    conserve's loglikelihoods, than twice the largest difference, where the two arms may pick
    different answers."""
    from lm_eval.api.model import hash_args
    from sqlitedict import SqliteDict

    from conserve_bench.store import Store

    store = Store(conserve_db)
    [job] = store.list_jobs()
    diffs, greedy_differ, choices = [], 0, {}
    with SqliteDict(str(hf_cache), flag="r") as cached:
        for item in store.job_items(job.id, with_args=True):
            key = hash_args(item["kind"], item["args"])
            if item["kind"] != "loglikelihood" or key not in cached:
                continue
            (ours, our_greedy), (theirs, their_greedy) = item["result"], cached[key]
            diffs.append(abs(ours - theirs))
            greedy_differ += bool(our_greedy) != bool(their_greedy)
            choices.setdefault(item["args"][0], []).append(ours)
    worst = max(diffs, default=0.0)
    gaps = [b - a for a, b in (sorted(lls)[-2:] for lls in choices.values() if len(lls) > 1)]
    return {"num_compared": len(diffs), "max_abs_diff": worst,
            "median_abs_diff": sorted(diffs)[len(diffs) // 2] if diffs else 0.0,
            "num_is_greedy_differ": greedy_differ,
            "num_near_ties": sum(gap < 2 * worst for gap in gaps)}


def markdown_header() -> list[str]:
    return ["| questions per subject (items) | conserve end to end s | hf end to end s (batch) | "
            "end to end | conserve eval s (items/s) | hf eval s (items/s) | eval | MMLU acc conserve / hf | "
            "subjects identical |",
            "|---|---|---|---|---|---|---|---|---|"]


def markdown_row(run: dict) -> str:
    c, h, x = run["conserve"], run["hf"], run["compare"]
    same = f"{x['num_subjects'] - len(x['differing'])}/{x['num_subjects']}"
    label = run.get("label") or run["limit"] or "all"
    return (f"| {label} ({c['num_items']:,}) | {c['total_s']:,.0f} | "
            f"{h['total_s']:,.0f} ({h['batch_size']}) | {x['end_to_end_x']:.2f}x | "
            f"{c['eval_s']:,.0f} ({_items_per_s(c)}) | "
            f"{h['eval_s']:,.0f} ({_items_per_s(h)}) | {x['eval_x']:.2f}x | "
            f"{c['acc'].get('mmlu', float('nan')):.4f} / {h['acc'].get('mmlu', float('nan')):.4f} | {same} |")


def _items_per_s(arm: dict) -> str:
    """Items/s of the evaluation; a transcribed arm holds the figure printed then (None: not known)."""
    rate = arm["items_per_s"] if "items_per_s" in arm else arm["num_items"] / arm["eval_s"]
    return "-" if rate is None else f"{rate:.1f}"


def markdown(runs: list[dict]) -> list[str]:
    return markdown_header() + [markdown_row(run) for run in runs]


def request_line(r: dict) -> str:
    """The shards' request-by-request comparison (`combine`'s: the median is the largest shard's)."""
    return (f"per request ({r['num_compared']:,} answered by both): |loglikelihood difference| at most "
            f"{r['max_abs_diff']:.2g} nats (median at most {r['median_abs_diff']:.2g} in any shard), "
            f"is_greedy different on "
            f"{r['num_is_greedy_differ']}; {r['num_near_ties']} questions with their two best choices "
            f"closer than twice that")


def _save(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
