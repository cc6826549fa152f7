"""lm-eval backends side by side, one run: `conserve` (embedded and client) vs `hf` vs
`local-completions` pointed at `conserve-bench serve`.

Same model directory, same questions (the local MMLU task YAML, `tasks/mmlu_local`), same
few-shot setting, one backend after the other on an otherwise idle machine. Each backend
runs in a fresh process, built as lm-eval's CLI builds it (`get_model(name)` from
`--model_args`); the table shows model load, evaluation and whole-process wall time,
requests/s of the evaluation, and the accuracy (which must be equal everywhere).
The server (policy `priority`, fresh store) is started once and serves both HTTP rows.
Writes benchmarks/measured/lm_eval_speed.json.

    pip install -e ".[bench]"   # lm-eval's HTTP backends need lm-eval[api]
    python -m benchmarks.lm_eval_speed --limit 10 --num-fewshot 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, add_measured_args, measure_host, write_measured

DEFAULT_TASKS = "mmlu_local_anatomy,mmlu_local_high_school_geography,mmlu_local_marketing,mmlu_local_astronomy"


def model_args(backend: str, args, workdir: Path, url: str | None) -> str:
    from conserve_bench.engine.models import resolve_model

    path = resolve_model("smollm2-135m").path
    return {
        "hf": f"pretrained={path},dtype=float32",
        "conserve": f"model=smollm2-135m,db=sqlite:///{workdir / 'embedded.db'},progress=False",
        "conserve-client": f"base_url={url},progress=False",
        "local-completions": (f"model=smollm2-135m,base_url={url}/v1/completions,tokenizer={path},"
                              f"num_concurrent={args.num_concurrent},max_retries=3"),
    }[backend]


def run_backend(backend: str, margs: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.lm_eval_speed", "--one-backend", backend, "--model-args", margs,
           "--tasks", args.tasks, "--limit", str(args.limit), "--num-fewshot", str(args.num_fewshot),
           "--data-dir", args.data_dir, "--hf-batch-size", str(args.hf_batch_size)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{backend} failed:\n{out.stderr[-3000:]}")
    return {"total_s": time.perf_counter() - t0, **json.loads(out.stdout.strip().splitlines()[-1])}


def run_one_backend(args) -> None:
    """One backend, built from model args exactly as `lm_eval --model NAME` builds it."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from conserve_bench.harness import register
    from conserve_bench.tasks import TASKS_DIR

    register()
    name = "conserve" if args.one_backend.startswith("conserve") else args.one_backend
    t0 = time.perf_counter()
    # NOTE: what lm-eval's CLI adds to --model_args (--batch_size, --device)
    extra = {"batch_size": args.hf_batch_size if name == "hf" else 1, "device": "cpu"}
    lm = get_model(name).create_from_arg_string(args.model_args, extra)
    load_s = time.perf_counter() - t0
    tasks = args.tasks.split(",")
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": args.data_dir})
    t0 = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                              task_manager=manager, log_samples=False)
    eval_s = time.perf_counter() - t0
    if hasattr(lm, "close"):
        lm.close()
    num_requests = 4 * sum(results["n-samples"][t]["effective"] for t in tasks)
    accuracy = {t: v["acc,none"] for t, v in results["results"].items() if "acc,none" in v}
    print(json.dumps({"load_s": load_s, "eval_s": eval_s, "num_requests": num_requests, "acc": accuracy}))


def start_server(workdir: Path, data_dir: str):
    """`conserve-bench serve` (policy priority, fresh store); returns it and its start-up time."""
    from conserve_bench.serve.process import ServerProcess

    t0 = time.perf_counter()
    server = ServerProcess(["--policy", "priority", "--no-profile", "--db",
                            f"sqlite:///{workdir / 'server.db'}", "--data-dir", data_dir,
                            "--output", str(workdir)], workdir)
    return server, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/data/mmlu"))
    parser.add_argument("--hf-batch-size", type=int, default=1)
    parser.add_argument("--num-concurrent", type=int, default=8, help="local-completions concurrency")
    add_measured_args(parser, "lm_eval_speed")
    parser.add_argument("--one-backend", help=argparse.SUPPRESS)
    parser.add_argument("--model-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_backend:
        return run_one_backend(args)
    host = measure_host(args)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for backend in ("hf", "conserve"):
            rows[backend] = run_backend(backend, model_args(backend, args, workdir, None), args)
        server, server_start_s = start_server(workdir, args.data_dir)
        try:
            for backend in ("local-completions", "conserve-client"):
                rows[backend] = run_backend(backend, model_args(backend, args, workdir, server.url), args)
        finally:
            server.stop()
    report = {"server_start_s": server_start_s, "backends": rows,
              "same_accuracy": len({json.dumps(r["acc"], sort_keys=True) for r in rows.values()}) == 1}
    config = {k: v for k, v in vars(args).items() if k not in ("one_backend", "model_args")}
    write_measured("lm_eval_speed", report, config, host, path=args.measured)
    print_table(report)


def print_table(report: dict) -> None:
    print("| backend | requests | model load s | eval s | eval req/s | process wall s | end-to-end req/s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in report["backends"].items():
        print(f"| {name} | {r['num_requests']} | {r['load_s']:.1f} | {r['eval_s']:.1f} | "
              f"{r['num_requests'] / r['eval_s']:.2f} | {r['total_s']:.1f} | "
              f"{r['num_requests'] / r['total_s']:.2f} |")
    print(f"server start-up (not in the HTTP rows): {report['server_start_s']:.1f} s; "
          f"accuracy identical across backends: {report['same_accuracy']}")


if __name__ == "__main__":
    main()
