"""A generation job SIGKILLed at half its tokens and resumed: what the kill costs.

Generation items (MMLU questions as chain-of-thought prompts, `--max-gen-toks` each, a stop
string they rarely meet) run as one job three ways, each killed run in a child process of its
own (its own engine) that reports its generated tokens after every step:

1. `checkpointed` (the name the committed record gives the run with partials): SIGKILL at
   `--kill-at` of the tokens, then resumed in this process: the generations continue from
   their saved partials (the default `--partial-tokens`).
2. `restarted`: the same with partials off (`--partial-tokens 0`): what a kill cost
   before partial generations, every generation in flight starts over.
3. `uninterrupted`: the job in one run, partials on (its store share is the steady cost).

Printed (JSON): per way the tokens generated before the kill and after, total / uninterrupted
(goal <= 1.05x checkpointed; restarted shows the old cost), the tokens re-prefilled to
continue, and the store's share of each run's wall time (goal <= 1%), partial saves included;
also written to `--output`/partial-generations-<time>/summary.json and
benchmarks/measured/partial_generations.json.

    python -m benchmarks.partial_generations --data-dir ../shared/data/mmlu                # measured
    python -m benchmarks.partial_generations --data-dir ../shared/data/mmlu --items 4 --max-gen-toks 64 \
        --no-profile --measured /tmp/partial-generations.json                             # smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import add_measured_args, measure_host, write_measured

STOP = "\n\n\n\n"  # rarely met: the generations run to --max-gen-toks, as long CoT does


def prompts(data_dir: str, num_items: int) -> list[str]:
    """MMLU test questions, across subjects in name order, as chain-of-thought prompts."""
    out: list[str] = []
    for path in sorted(Path(data_dir, "test").glob("*_test.csv")):
        with path.open(newline="") as f:
            for row in csv.reader(f):
                choices = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", row[1:5]))
                out.append(f"Question: {row[0]}\n{choices}\nLet's think step by step, in detail.\n")
                if len(out) == num_items:
                    return out
    raise SystemExit(f"only {len(out)} questions in {data_dir}")


def run_config(args, partial_tokens: int):
    from conserve_bench.config import RunConfig

    return RunConfig(max_inflight=args.max_inflight, partial_tokens=partial_tokens,
                     partial_s=args.partial_s)


def fingerprint(args) -> str:
    """The fingerprint of the engines `start` starts (item keys depend on it)."""
    from conserve_bench.engine.local import engine_config, engine_fingerprint
    from conserve_bench.engine.models import resolve_model

    return engine_fingerprint(engine_config(resolve_model("smollm2-135m")), args.max_model_len)


def start(args):
    from benchmarks.common import start_engine
    from conserve_bench.engine.models import resolve_model

    return start_engine(resolve_model("smollm2-135m"), max_model_len=args.max_model_len)


def submit(db_url: str, args) -> str:
    """A fresh store holding the job."""
    from conserve_bench.jobs.lifecycle import submit_requests
    from conserve_bench.store import Store

    requests = [("generate_until", [text, {"until": [STOP], "max_gen_toks": args.max_gen_toks}])
                for text in prompts(args.data_dir, args.items)]
    job, _ = submit_requests(Store(db_url), requests, fingerprint(args), "smollm2-135m",
                             "partial-generations")
    return job.id


def child(db_url: str, job_id: str, counter: Path, partial_tokens: int, args) -> None:
    """The run to be killed: its own engine; after each step, its tokens so far to `counter`."""
    from conserve_bench.jobs.lifecycle import run_job
    from conserve_bench.store import Store

    def report(done: int, total: int, tokens: int) -> None:
        counter.with_suffix(".tmp").write_text(str(tokens))
        os.replace(counter.with_suffix(".tmp"), counter)

    with start(args) as engine:
        report(0, 0, 0)
        run_job(Store(db_url), job_id, engine, run_config(args, partial_tokens), output_dir=None,
                on_progress=report)


def kill_at(db_url: str, job_id: str, out: Path, partial_tokens: int, args) -> dict:
    """Run the job in a child process, SIGKILL it once it generated `--kill-at` of the tokens."""
    counter = out / f"tokens-{partial_tokens}.txt"
    target = args.kill_at * args.items * args.max_gen_toks
    cmd = [sys.executable, "-m", "benchmarks.partial_generations", "--child", db_url, job_id, str(counter),
           str(partial_tokens), *sys.argv[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(out / "child.log").open("a"),
                            start_new_session=True)
    tokens = 0
    while tokens < target:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before the kill (exit {proc.returncode}); see {out}/child.log")
        time.sleep(0.02)
        tokens = int(counter.read_text() or 0) if counter.exists() else 0
    os.killpg(proc.pid, signal.SIGKILL)  # the child and its engine processes
    proc.wait()
    return {"generated_before_kill": int(counter.read_text())}


def finish(engine, db_url: str, job_id: str, partial_tokens: int, args) -> dict:
    from conserve_bench.jobs.lifecycle import run_job
    from conserve_bench.store import Store

    store = Store(db_url)
    meta = run_job(store, job_id, engine, run_config(args, partial_tokens), output_dir=None)["conserve"]
    texts = [item["result"] for item in store.job_items(job_id)]
    return {"generated": meta["num_generated_tokens"], "wall_s": round(meta["wall_s"], 2),
            "store_share": meta["store_share"], "num_partial_saves": meta["num_partial_saves"],
            "partials_s": meta["partials_s"], "reprefilled": meta["resumes"]["num_reused_tokens"],
            "num_resumes": meta["resumes"]["num_resumes"], "texts": texts}


def main() -> None:
    from conserve_bench.config import DEFAULT_PARTIAL_S, DEFAULT_PARTIAL_TOKENS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="MMLU CSV folder (test/)")
    parser.add_argument("--items", type=int, default=32, help="generation items in the job")
    parser.add_argument("--max-gen-toks", type=int, default=512)
    parser.add_argument("--max-inflight", type=int, default=32)
    parser.add_argument("--partial-tokens", type=int, default=DEFAULT_PARTIAL_TOKENS)
    parser.add_argument("--partial-s", type=float, default=DEFAULT_PARTIAL_S)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the tokens at the kill")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--output", default="results")
    add_measured_args(parser, "partial_generations")
    if sys.argv[1:2] == ["--child"]:
        db_url, job_id, counter, partial_tokens = sys.argv[2:6]
        child(db_url, job_id, Path(counter), int(partial_tokens), parser.parse_args(sys.argv[6:]))
        return
    args = parser.parse_args()
    args.data_dir = os.path.abspath(args.data_dir)
    host = measure_host(args)

    out = Path(args.output).resolve() / time.strftime("partial-generations-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    ways = {"checkpointed": args.partial_tokens, "restarted": 0, "uninterrupted": args.partial_tokens}
    stores = {way: (f"sqlite:///{out / f'{way}.db'}") for way in ways}
    jobs = {way: submit(url, args) for way, url in stores.items()}
    killed = {way: kill_at(stores[way], jobs[way], out, ways[way], args)
              for way in ("checkpointed", "restarted")}
    with start(args) as engine:
        if engine.fingerprint != fingerprint(args):  # NOTE: else no item would be found done
            raise SystemExit(f"the engine runs as {engine.fingerprint}, not {fingerprint(args)}")
        runs = {way: finish(engine, stores[way], jobs[way], ways[way], args) for way in ways}

    reference = runs["uninterrupted"]
    setting = {k: v for k, v in vars(args).items() if k != "data_dir"}
    summary: dict = {"setting": setting}
    for way, run in runs.items():
        before = killed.get(way, {}).get("generated_before_kill", 0)
        total = before + run["generated"]
        summary[way] = {
            "generated_before_kill": before, "generated_after": run["generated"],
            "total_generated": total, "vs_uninterrupted": round(total / reference["generated"], 4),
            "killed_at": round(before / reference["generated"], 3),
            "reprefilled": run["reprefilled"], "num_resumes": run["num_resumes"],
            "wall_s": run["wall_s"], "store_share": run["store_share"],
            "num_partial_saves": run["num_partial_saves"], "partials_s": run["partials_s"],
            "texts_equal_uninterrupted": run["texts"] == reference["texts"],
        }
    checkpointed = summary["checkpointed"]
    summary["goals"] = {
        "tokens_le_1.05x": checkpointed["vs_uninterrupted"] <= 1.05,
        "store_share_le_1pct": max(summary[w]["store_share"] or 0 for w in ways) <= 0.01,
        "texts_equal": checkpointed["texts_equal_uninterrupted"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    write_measured("partial_generations", {k: v for k, v in summary.items() if k != "setting"}, setting,
                   host, path=args.measured)


if __name__ == "__main__":
    main()
