"""A nightly `conserve-bench ci` against a running `serve` with online traffic, killed half-way.

1. Reference: a fresh server (store A) with online traffic; `ci --write-baseline` runs the
   nightly (local MMLU, a few subjects, a limit) uninterrupted and writes the baselines.
2. A second fresh server (store B) with online traffic; `ci --run-key nightly` is sent SIGTERM
   (what CI sends on cancel; `--signal KILL` for a lost runner) once the job is half done:
   exit 4 and an INCOMPLETE report. The same command then runs again with the same key.
3. Checked: the rerun re-attached to the same job (one job holds the key), no item was sent
   to the engine twice (`Store.run_counts` of store B), the report's rows equal the reference
   run's, and `--compare-to` the reference's results file gives Δ = 0 and p = 1 per task.

Writes `--output`/nightly-resume-<time>/summary.json and benchmarks/measured/nightly_resume.json.

    python -m benchmarks.nightly_resume --data-dir ../shared/data/mmlu          # measured setting
    python -m benchmarks.nightly_resume --data-dir ../shared/data/mmlu --subjects anatomy,marketing \
        --limit 8 --num-fewshot 0 --no-profile --measured /tmp/nightly-resume.json   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.common import add_measured_args, measure_host, write_measured
from conserve_bench.config import ServePolicy

DEFAULT_SUBJECTS = "anatomy,high_school_geography,marketing,astronomy"
ROW_FIELDS = ("config", "task", "metric", "verdict", "baseline", "measured", "threshold", "n", "stderr")


class OnlineTraffic:
    """A bounded loop of streamed completions to one server, on its own thread, until stopped."""

    def __init__(self, url: str, max_requests: int, context_tokens: int, generated_tokens: int):
        self.url, self.max_requests = url, max_requests
        self.shape = (context_tokens, generated_tokens)
        self.records: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)

    def __enter__(self) -> "OnlineTraffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    async def _loop(self) -> None:
        from conserve_bench.bench.loadgen import OnlineClient
        from conserve_bench.bench.workload import OnlineRequest

        client = OnlineClient(self.url, "smollm2-135m", seed=0)
        t0 = time.perf_counter()
        try:
            for index in range(self.max_requests):
                if self._stop.is_set():
                    break
                request = OnlineRequest(time.perf_counter() - t0, *self.shape)
                self.records.append(await client.stream(index, request, t0))
        finally:
            await client.close()

    def summary(self) -> dict:
        from conserve_bench.bench.summary import percentiles

        done = [r for r in self.records if r.error is None and r.ttft_s is not None]
        return {"num_requests": len(self.records), "num_completed": len(done),
                "ttft_ms": {k: v and round(v * 1000, 1) for k, v in percentiles([r.ttft_s for r in done]).items()},
                "tbt_ms": {k: v and round(v * 1000, 1)
                           for k, v in percentiles([g for r in done for g in r.tbt_s]).items()}}


def start_server(name: str, args, out: Path, profiles):
    from conserve_bench.serve.process import ServerProcess

    folder = out / name
    folder.mkdir(parents=True)
    db_url = f"sqlite:///{(folder / 'jobs.db').resolve()}"
    profiles.copy_to(db_url)  # NOTE: else each fresh server profiles this machine again (~90 s)
    server = ServerProcess(["--db", db_url, "--data-dir", args.data_dir, "--output", str(folder),
                            "--policy", args.policy, "--max-offline-inflight", str(args.max_offline_inflight)],
                           folder)
    profiles.learn_from(db_url)
    return server, db_url


def ci_command(config: Path, url: str, run_key: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "conserve_bench.cli", "ci", str(config), "--server", url,
            "--run-key", run_key, "--json", "--output", str(out / "results"), *extra]


def run_ci(cmd: list[str]) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    if not out.stdout.strip():
        raise SystemExit(f"ci printed no report (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return out.returncode, json.loads(out.stdout), wall_s


def kill_at_half(cmd: list[str], url: str, run_key: str, sig: signal.Signals) -> dict:
    """Start the ci run, signal it once its job is half done; what it reported and when."""
    http = httpx.Client(base_url=url, timeout=120)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.perf_counter()
    job = None
    while proc.poll() is None:
        try:  # NOTE: while the server builds a job's requests (lm-eval, in Python) it answers slowly
            listed = http.get("/v1/jobs").json()["jobs"]
        except httpx.TimeoutException:
            continue
        jobs = [j for j in listed if (j["run_key"] or "").startswith(run_key + "/")]
        if jobs and jobs[0]["total"] and jobs[0]["done"] >= jobs[0]["total"] / 2:
            job = jobs[0]
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    if job is None:
        raise SystemExit(f"the run ended before half-way (exit {proc.returncode}); raise --limit\n{stderr[-2000:]}")
    return {"signal": sig.name, "at_s": round(time.perf_counter() - t0, 1), "done": job["done"],
            "total": job["total"], "exit_code": proc.returncode,
            "status": json.loads(stdout)["status"] if stdout.strip() else None}


def rows(report: dict) -> list[dict]:
    return [{k: r[k] for k in ROW_FIELDS} for r in report["rows"]]


def write_config(path: Path, args) -> Path:
    tasks = {f"mmlu_local_{s.strip()}": {"metrics": ["acc"]} for s in args.subjects.split(",")}
    doc = {"model": "smollm2-135m", "limit": args.limit, "num_fewshot": args.num_fewshot, "tasks": tasks}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="MMLU CSV folder (test/, dev/, val/)")
    parser.add_argument("--subjects", default=DEFAULT_SUBJECTS)
    parser.add_argument("--limit", type=int, default=40, help="questions per subject")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--policy", default=ServePolicy.CONSERVE.value, choices=[p.value for p in ServePolicy])
    parser.add_argument("--max-offline-inflight", type=int, default=32)
    parser.add_argument("--online-requests", type=int, default=400, help="bound of each server's online loop")
    parser.add_argument("--online-context-tokens", type=int, default=128)
    parser.add_argument("--online-generated-tokens", type=int, default=32)
    parser.add_argument("--signal", default="TERM", choices=("TERM", "INT", "KILL"))
    parser.add_argument("--profile-db", default="sqlite:///conserve.db",
                        help="where this machine's latency profile is kept (as `bench --db`)")
    parser.add_argument("--output", default="results")
    add_measured_args(parser, "nightly_resume")
    args = parser.parse_args()
    args.data_dir = os.path.abspath(args.data_dir)
    host = measure_host(args)

    from conserve_bench.bench.phases import ProfileCache
    from conserve_bench.store import Store

    out = Path(args.output) / time.strftime("nightly-resume-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    config = write_config(out / "nightly.yaml", args)
    profiles = ProfileCache(args.profile_db, "smollm2-135m")
    online = (args.online_requests, args.online_context_tokens, args.online_generated_tokens)
    setting = {k: v for k, v in vars(args).items() if k != "data_dir"}
    summary: dict = {"setting": setting}

    server, _ = start_server("reference", args, out, profiles)
    try:
        with OnlineTraffic(server.url, *online) as traffic:
            code, written, wall_s = run_ci(ci_command(config, server.url, "ref", out, "--write-baseline"))
            if code != 0:
                raise SystemExit(f"the reference run exited {code}: {written.get('message')}")
            # the same key again: nothing computed, the rows gated against the baselines just written
            code, reference, _ = run_ci(ci_command(config, server.url, "ref", out))
        summary["reference"] = {"wall_s": round(wall_s, 1), "online": traffic.summary()}
        reference_results = out / "results" / f"{reference['jobs'][0]['id']}.json"
    finally:
        server.stop()

    server, db_url = start_server("interrupted", args, out, profiles)
    try:
        with OnlineTraffic(server.url, *online) as traffic:
            killed = kill_at_half(ci_command(config, server.url, "nightly", out), server.url, "nightly",
                                  signal.Signals[f"SIG{args.signal}"])
            code, resumed, wall_s = run_ci(ci_command(config, server.url, "nightly", out,
                                                      "--compare-to", str(reference_results)))
        online_summary = traffic.summary()
    finally:
        server.stop()

    store = Store(db_url)
    (job,) = resumed["jobs"]
    runs = store.run_counts(job["id"])
    keyed = [j for j in store.list_jobs() if (j.run_key or "").startswith("nightly/")]
    summary.update({
        "killed": killed,
        "resumed": {"exit_code": code, "status": resumed["status"], "wall_s": round(wall_s, 1),
                    "job": job["id"], "online": online_summary},
        "num_jobs_with_the_key": len(keyed),
        "num_items": len(runs),
        "num_items_computed_twice": sum(n > 1 for n in runs.values()),
        "report_identical": rows(resumed) == rows(reference),
        "paired_vs_reference": {r["task"]: {"delta": r["delta"], "p": r["p"], "test": r["test"]}
                                for r in resumed["rows"]},
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    write_measured("nightly_resume", {k: v for k, v in summary.items() if k != "setting"}, setting, host,
                   path=args.measured)
    ok = (killed["exit_code"] in (4, -9) and code == 0 and len(keyed) == 1
          and summary["num_items_computed_twice"] == 0 and summary["report_identical"]
          and all(v["delta"] == 0 and v["p"] == 1 for v in summary["paired_vs_reference"].values()))
    print(f"{'OK' if ok else 'FAILED'}: wrote {out}/summary.json")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
