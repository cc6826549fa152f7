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
    python benchmarks/submit_vs_hf.py --limits 0 --hf-batch-sizes 4 --state-dir DIR   # full MMLU: hours

With `--state-dir` (one limit, one hf batch size) the run survives interruption: conserve's
store, hf's request cache (lm-eval's `--use_cache`) and every segment's timings live in DIR,
and SIGTERM ends the current segment (conserve drains and records its progress; hf keeps every
answered request). Rerun the same command to continue; wall times are then the sums over
segments, each paying its own start-up (counted, not hidden), and the evaluation alone is
conserve's recorded run time and hf's time after its model loaded, summed. Both arms' answers
being stored, the report then compares them request by request too (`compare_requests`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    parser.add_argument("--state-dir", help="Keep the run's state here; rerun to continue an interrupted run.")
    parser.add_argument("--hf-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_cli is not None:
        return hf_cli(args.hf_cli)
    batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    if args.state_dir:
        if "," in args.limits or len(batch_sizes) > 1:
            parser.error("--state-dir runs one limit at one hf batch size")
        return run_resumable(args, int(args.limits), batch_sizes[0])
    report = {"config": vars(args), "host": None if args.no_profile else host_profile(), "runs": []}
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


class Segments:
    """The timed segments of a resumable run, in `state_dir/segments.json`. A segment is one
    process from start to exit; SIGTERM to this script ends the current one early."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "segments.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"segments": []}
        self.stopping = False
        self.child: subprocess.Popen | None = None
        signal.signal(signal.SIGTERM, self._stop)

    def _stop(self, signum, _frame) -> None:
        self.stopping = True
        if self.child is not None:
            self.child.send_signal(signum)

    def run(self, arm: str, cmd: list[str], env: dict | None = None, eval_s=None) -> bool:
        """Runs `cmd` as one segment of `arm`; True if it finished, False if it was stopped.
        `eval_s(end)`, if given, is the segment's evaluation time (hf's)."""
        if self.stopping:
            return False
        t0 = time.perf_counter()
        self.child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, **(env or {})})
        _, err = self.child.communicate()
        returncode, self.child = self.child.returncode, None
        segment = {"arm": arm, "total_s": round(time.perf_counter() - t0, 3), "stopped": self.stopping}
        if eval_s is not None:
            segment["eval_s"] = eval_s(time.time())
        self.state["segments"].append(segment)
        self.save()
        if returncode != 0 and not self.stopping:
            sys.exit(f"{arm} exited with {returncode}:\n{err[-3000:]}")
        return not self.stopping

    def save(self) -> None:
        self.path.write_text(json.dumps(self.state, indent=2))

    def total(self, arm: str, key: str = "total_s") -> float:
        return sum(s.get(key) or 0.0 for s in self.state["segments"] if s["arm"] == arm)


def run_resumable(args, limit: int, batch_size: int) -> None:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    segments = Segments(state_dir)
    if "host" not in segments.state:
        segments.state["host"] = None if args.no_profile else host_profile()
        segments.save()
    conserve = resumable_conserve(args, limit, state_dir, segments)
    hf = conserve and resumable_hf(args, limit, batch_size, state_dir, segments)
    if not hf:
        print(f"stopped; rerun to continue ({len(segments.state['segments'])} segments so far)", flush=True)
        return
    run = {"limit": limit or None, "conserve": conserve, "hf": hf,
           "segments": {arm: sum(s["arm"] == arm for s in segments.state["segments"]) for arm in ("conserve", "hf")}}
    run["compare"] = compare(conserve, hf)
    run["requests"] = compare_requests(f"sqlite:///{state_dir}/conserve.db", state_dir / "hf-cache_rank0.db")
    report = {"config": vars(args), "host": segments.state["host"], "runs": [run]}
    _save(report, args.out)
    print("\n".join(markdown(report)))


def resumable_conserve(args, limit: int, state_dir: Path, segments: Segments) -> dict | None:
    from conserve_bench.store import JobState, Store

    db, output = f"sqlite:///{state_dir}/conserve.db", state_dir / "conserve"
    while True:
        jobs = Store(db).list_jobs() if (state_dir / "conserve.db").exists() else []
        if jobs and jobs[0].state == JobState.DONE:
            break
        cmd = conserve_command(args, limit, db, output) if not jobs else \
            [sys.executable, "-m", "conserve_bench.cli", "resume", jobs[0].id, "--db", db, "--output", str(output)]
        if not segments.run("conserve", cmd):
            return None
    results = json.loads((output / f"{jobs[0].id}.json").read_text())
    return conserve_result(results, segments.total("conserve"), results["conserve"]["total_run_s"])


def resumable_hf(args, limit: int, batch_size: int, state_dir: Path, segments: Segments) -> dict | None:
    output, timings = state_dir / "hf", state_dir / "hf-timings.json"
    cmd = hf_command(args, limit, batch_size, output) + ["--use_cache", str(state_dir / "hf-cache")]

    def eval_s(end: float) -> float | None:
        ready = json.loads(timings.read_text()).get("ready_at") if timings.exists() else None
        return round(end - ready, 3) if ready else None

    while not list(output.rglob("results_*.json")):
        timings.unlink(missing_ok=True)
        if not segments.run("hf", cmd, env={"TIMINGS": str(timings)}, eval_s=eval_s):
            return None
    return hf_result(output, batch_size, segments.total("hf"), segments.total("hf", "eval_s"))


def run_conserve(args, limit: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = conserve_command(args, limit, f"sqlite:///{tmp}/c.db", tmp)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        total_s = time.perf_counter() - t0
        results = json.loads((Path(tmp) / f"{json.loads(out.stdout)['id']}.json").read_text())
    return conserve_result(results, total_s, results["conserve"]["wall_s"])


def conserve_command(args, limit: int, db: str, output) -> list[str]:
    return [sys.executable, "-m", "conserve_bench.cli", "submit", "mmlu", "--num-fewshot",
            str(args.num_fewshot), "--data-dir", args.data_dir, "--db", db,
            "--output", str(output), "--json", *(["--limit", str(limit)] if limit else [])]


def conserve_result(results: dict, total_s: float, eval_s: float) -> dict:
    meta = results["conserve"]
    return {"total_s": total_s, "eval_s": eval_s, "num_items": meta["num_items"],
            "store_share": meta["store_share"], "acc": accuracies(results, "mmlu_")}


def run_hf(args, limit: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        t0 = time.perf_counter()
        subprocess.run(hf_command(args, limit, batch_size, tmp), check=True, capture_output=True,
                       env={**os.environ, "TIMINGS": str(timings)})
        end = time.time()
        return hf_result(Path(tmp), batch_size, time.perf_counter() - t0,
                         end - json.loads(timings.read_text())["ready_at"])


def hf_command(args, limit: int, batch_size: int, output) -> list[str]:
    from conserve_bench.engine.models import resolve_model
    from conserve_bench.tasks import TASKS_DIR

    return [sys.executable, __file__, "--hf-cli", "run", "--model", "hf", "--model_args",
            f"pretrained={resolve_model('smollm2-135m').path},dtype=float32", "--device", "cpu",
            "--batch_size", str(batch_size), "--tasks", "mmlu_local", "--num_fewshot",
            str(args.num_fewshot), "--include_path", str(TASKS_DIR), "--metadata",
            json.dumps({"data_dir": args.data_dir}), "--output_path", str(output),
            *(["--limit", str(limit)] if limit else [])]


def hf_result(output: Path, batch_size: int, total_s: float, eval_s: float) -> dict:
    [results_file] = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    num_items = NUM_CHOICES * sum(n["effective"] for n in results["n-samples"].values())
    return {"batch_size": batch_size, "total_s": total_s, "eval_s": eval_s,
            "num_items": num_items, "acc": accuracies(results, "mmlu_local_")}


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
    lines += markdown_header() + [markdown_row(run) for run in report["runs"]]
    for run in report["runs"]:
        if "requests" in run:
            r = run["requests"]
            lines.append(f"per request ({r['num_compared']} answered by both): |loglikelihood "
                         f"difference| at most {r['max_abs_diff']:.2g} nats (median "
                         f"{r['median_abs_diff']:.2g}), is_greedy different on {r['num_is_greedy_differ']}; "
                         f"{r['num_near_ties']} questions with their two best choices closer than twice that")
    return lines


def _save(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
