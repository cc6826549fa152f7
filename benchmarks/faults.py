"""Faults against a real `serve`: what the server does, and whether every job still ends as an
undisturbed run does.

One row per fault, each on fresh servers (SmolLM2, eager engines to save start-up time) and
a fresh store, beside one undisturbed run of the same MMLU job:

- `sigkill-serve`: SIGKILL of the whole server (engine included) at three random points of
  the job; a new server on the same store each time.
- `sigkill-engine-core`: SIGKILL of vLLM's engine-core process mid-job; the server must hand
  its items back, exit non-zero (3) and a restarted server finish the job.
- `outage-sqlite`, `outage-postgres`: a fleet of two replicas; the store is unavailable for
  three leases (SQLite: another process holds its write lock; PostgreSQL: the server is
  stopped, then started again).
- `pump-exception`: the offline pump fails three times in a row (`CONSERVE_BENCH_FAULTS`).
- `migration-crash`: a crash inside a store migration, then the same command again.
- `unauthenticated-flood`: 1,000 requests without the key while a job runs: offline items/s
  beside windows without them, steps cut, online latency samples made.
- `task-path`, `big-body`: a task given as a YAML path whose `!function` would run code; a
  20 MB body.

Each row: the exit code and `/health` answers seen, whether the job completed with the scores
and per-request results of the undisturbed run, and how many items were computed twice (at
most the in-flight window per interruption). Writes benchmarks/measured/faults.json and prints
the table of docs/operations.md.

    python -m benchmarks.faults                       # every row, about 15 minutes on 2 cores
    python -m benchmarks.faults --rows task-path,big-body
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.common import REPO, host_profile, measured_path, write_measured
from conserve_bench.serve.process import ServerProcess
from conserve_bench.store import Store

KEY = "fault-key"
MAX_INFLIGHT = 16
ROWS = ("sigkill-serve", "sigkill-engine-core", "outage-sqlite", "outage-postgres",
        "pump-exception", "migration-crash", "unauthenticated-flood", "task-path", "big-body")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="Comma-separated rows to run.")
    parser.add_argument("--data-dir", default=os.environ.get(
        "CONSERVE_BENCH_DATA", str(REPO.parent / "shared" / "data" / "mmlu")))
    parser.add_argument("--tasks", default="mmlu_anatomy,mmlu_marketing")
    parser.add_argument("--limit", type=int, default=60, help="Questions per task.")
    parser.add_argument("--flood-tasks", default="mmlu_high_school_psychology,mmlu_professional_law",
                        help="The flood row's job: long enough to outlast its four 10-s windows.")
    parser.add_argument("--flood-limit", type=int, default=300, help="Questions per task, flood row.")
    parser.add_argument("--lease-s", type=float, default=4.0, help="Lease of the outage rows' fleet.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/faults")
    parser.add_argument("--measured", default=str(measured_path("faults")))
    return parser.parse_args()


class Run:
    """The folder, the latency profile and the job of this run of the fault suite."""

    def __init__(self, args):
        from conserve_bench.bench.phases import ProfileCache
        from conserve_bench.config import default_db_url

        self.args, self.out = args, Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.profiles = ProfileCache(default_db_url(), "smollm2-135m")
        self.job = {"tasks": args.tasks.split(","), "limit": args.limit,
                    "data_dir": os.path.abspath(args.data_dir)}
        self.baseline: dict[str, dict] = {}

    def folder(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.out))

    def server(self, folder: Path, db_url: str, *extra: str, env=None) -> ServerProcess:
        self.profiles.copy_to(db_url)  # NOTE: else every fresh store profiles this machine again
        server = ServerProcess(["--db", db_url, "--data-dir", self.job["data_dir"], "--output",
                                str(folder), "--api-key", KEY, "--max-offline-inflight",
                                str(MAX_INFLIGHT), *extra], folder,
                               env={"CONSERVE_BENCH_ENFORCE_EAGER": "1", **(env or {})})
        self.profiles.learn_from(db_url)
        return server

    def undisturbed(self, job: dict) -> dict:
        """Items and scores of `job` run alone (once per job)."""
        name = json.dumps(job, sort_keys=True)
        if name not in self.baseline:
            folder = self.folder("undisturbed")
            db_url = sqlite_url(folder)
            with self.server(folder, db_url) as server:
                job_id = post_job(server.url, job)
                wait_done(server.url, job_id)
            self.baseline[name] = finished(db_url, job_id)
        return self.baseline[name]


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'jobs.db'}"


def http(url: str, key: str | None = KEY, timeout_s: float = 30) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout_s,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def post_job(url: str, body: dict) -> str:
    response = http(url).post("/v1/jobs", json=body)
    response.raise_for_status()
    return response.json()["id"]


def job_status(url: str, job_id: str) -> dict | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = http(url, timeout_s=5).get(f"/v1/jobs/{job_id}")
        if response.status_code == 200:
            return response.json()
    return None


def wait_done(url: str, job_id: str, at_least: float = 1.0, timeout_s: float = 900) -> dict:
    """Wait until the job has `at_least` (a share) of its items done; its status."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = job_status(url, job_id)
        if job and job["state"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {job['state']}: {job.get('error')}")
        # NOTE: all items done is not the job done: its scores are computed and saved after
        if job and job["total"] and (job["state"] == "done" or (at_least < 1 and job["done"] >= at_least * job["total"])):
            return job
        time.sleep(0.2)
    raise RuntimeError(f"job {job_id} not at {at_least:.0%} within {timeout_s:.0f} s")


def finished(db_url: str, job_id: str) -> dict:
    store = Store(db_url)
    job = store.get_job(job_id)
    return {"state": str(job.state), "metrics": (store.get_results(job_id) or {}).get("results"),
            "items": {i["key"]: i["result"] for i in store.job_items(job_id)},
            "runs": store.run_counts(job_id)}


def compare(run: dict, baseline: dict) -> dict:
    """Completed, equal to the undisturbed run (scores and every request), computed twice."""
    diffs = [_max_diff(run["items"].get(key), result) for key, result in baseline["items"].items()]
    return {"completed": run["state"] == "done", "same_scores": run["metrics"] == baseline["metrics"],
            "same_requests": all(d is not None and d <= 1e-4 for d in diffs),
            "max_logprob_diff": max((d for d in diffs if d is not None), default=None),
            "computed_twice": sum(n - 1 for n in run["runs"].values() if n > 1)}


def _max_diff(a, b) -> float | None:
    """Largest difference between two item results (loglikelihoods: [logprob, is_greedy])."""
    if a is None or b is None or type(a) is not type(b):
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return None
        parts = [_max_diff(x, y) for x, y in zip(a, b)]
        return None if None in parts else max(parts, default=0.0)
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return 0.0 if a == b else None
    return abs(a - b)


class HealthWatch:
    """Polls `/health` of some servers on a thread; the answers seen (a code, or `down`)."""

    def __init__(self, urls: list[str]):
        self.urls, self.seen = urls, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            for url in self.urls:
                try:
                    self.seen.add(str(httpx.get(f"{url}/health", timeout=2).status_code))
                except httpx.HTTPError:
                    self.seen.add("down")


# --- the rows ---------------------------------------------------------------------------------

def sigkill_serve(run: Run) -> dict:
    folder, rng = run.folder("sigkill-serve"), random.Random(run.args.seed)
    db_url = sqlite_url(folder)
    points = sorted(rng.uniform(0.1, 0.9) for _ in range(3))
    server = run.server(folder, db_url)
    job_id = post_job(server.url, run.job)
    codes = []
    for share in points:
        wait_done(server.url, job_id, at_least=share)
        codes.append(server.signal(signal.SIGKILL))
        server = run.server(folder, db_url)
    with server, HealthWatch([server.url]) as health:
        wait_done(server.url, job_id)
    return {"server": f"killed at {', '.join(f'{p:.0%}' for p in points)} (exit {codes[0]}); "
                      "each restart resumed the job by itself",
            "health": sorted(health.seen), "interruptions": len(points),
            **compare(finished(db_url, job_id), run.undisturbed(run.job))}


def sigkill_engine_core(run: Run) -> dict:
    import psutil

    folder = run.folder("sigkill-engine-core")
    db_url = sqlite_url(folder)
    server = run.server(folder, db_url)
    job_id = post_job(server.url, run.job)
    wait_done(server.url, job_id, at_least=0.3)
    core = next(p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if p.name().startswith("VLLM::EngineCore"))
    t0 = time.perf_counter()
    with HealthWatch([server.url]) as health:
        core.kill()
        code = server.proc.wait(timeout=180)
    exit_s = time.perf_counter() - t0
    server.kill()
    store = Store(db_url)
    left = {"job": str(store.get_job(job_id).state), **store.item_states(job_id)}
    with run.server(folder, db_url) as server:
        wait_done(server.url, job_id)
    return {"server": f"exit {code} {exit_s:.1f} s after the kill; job left {left}; "
                      "a restart finished it",
            "exit_code": code, "health": sorted(health.seen), "interruptions": 1,
            **compare(finished(db_url, job_id), run.undisturbed(run.job))}


def outage(run: Run, dialect: str) -> dict:
    folder = run.folder(f"outage-{dialect}")
    lease_s = run.args.lease_s
    fleet = ["--lease-s", str(lease_s), "--heartbeat-s", str(lease_s / 8)]
    with contextlib.ExitStack() as stack:
        if dialect == "sqlite":
            db_url = sqlite_url(folder)
            hold = lambda: _hold_sqlite_lock(folder / "jobs.db", 3 * lease_s)  # noqa: E731
        else:
            from conserve_bench.store.pgcluster import ThrowawayCluster

            cluster = stack.enter_context(ThrowawayCluster(durable=True))
            db_url = cluster.create_database()
            hold = lambda: _stop_postgres(cluster, 3 * lease_s)  # noqa: E731
        servers = []
        for i in range(2):  # NOTE: a fleet of two replicas on the one store
            (replica := folder / f"replica{i}").mkdir()
            servers.append(stack.enter_context(run.server(replica, db_url, *fleet)))
        job_id = post_job(servers[0].url, run.job)
        wait_done(servers[0].url, job_id, at_least=0.3)
        with HealthWatch([s.url for s in servers]) as health:
            hold()
            wait_done(servers[0].url, job_id, timeout_s=600)
        alive = [s.proc.poll() is None for s in servers]
        result = finished(db_url, job_id)
    return {"server": f"store out for {3 * lease_s:g} s (3 leases); both replicas "
                      f"{'stayed up' if all(alive) else 'exited: ' + str(alive)}",
            "health": sorted(health.seen), "interruptions": 2,
            **compare(result, run.undisturbed(run.job))}


def _hold_sqlite_lock(path: Path, seconds: float) -> None:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def _stop_postgres(cluster, seconds: float) -> None:
    cluster.stop("immediate")
    time.sleep(seconds)
    cluster.start()


def pump_exception(run: Run) -> dict:
    folder = run.folder("pump-exception")
    db_url = sqlite_url(folder)
    with run.server(folder, db_url, env={"CONSERVE_BENCH_FAULTS": "pump.next_job:3"}) as server:
        with HealthWatch([server.url]) as health:
            job_id = post_job(server.url, run.job)
            wait_done(server.url, job_id)
        injected = server.log_tail(10**7).count("injected fault at pump.next_job")
    return {"server": f"logged {injected} injected pump failures, retried with backoff",
            "health": sorted(health.seen), "interruptions": 0,
            **compare(finished(db_url, job_id), run.undisturbed(run.job))}


def migration_crash(run: Run) -> dict:
    folder = run.folder("migration-crash")
    db_url = sqlite_url(folder)
    crashed = _cli("jobs", "--db", db_url, env={"CONSERVE_BENCH_FAULTS": "migration.after_ddl:1"})
    again = _cli("jobs", "--db", db_url)
    lines = crashed.stderr.strip().splitlines()
    return {"server": f"crashed command: exit {crashed.returncode}, {len(lines)} line "
                      f"({lines[-1][:80] if lines else ''!r}); the same command again: exit "
                      f"{again.returncode}", "health": [], "interruptions": 0,
            "completed": again.returncode == 0, "same_scores": None, "same_requests": None,
            "max_logprob_diff": None, "computed_twice": 0}


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conserve_bench.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def unauthenticated_flood(run: Run) -> dict:
    folder = run.folder("unauthenticated-flood")
    db_url = sqlite_url(folder)
    job = {**run.job, "tasks": run.args.flood_tasks.split(","), "limit": run.args.flood_limit}
    steps = folder / "steps.jsonl"
    with run.server(folder, db_url, "--step-log", str(steps)) as server:
        job_id = post_job(server.url, job)
        wait_done(server.url, job_id, at_least=0.05)
        windows = []
        for flood in (False, True, False, True):
            windows.append(_window(server.url, steps, flood, seconds=10.0))
        if job_status(server.url, job_id)["state"] == "done":
            raise RuntimeError("the flood row's job ended within its windows: raise --flood-limit")
        wait_done(server.url, job_id)
        samples = _metric(server.url, "conserve_online_slo_total")
    quiet = [w for w in windows if not w["flood"]]
    loud = [w for w in windows if w["flood"]]
    rate = lambda ws: sum(w["items"] for w in ws) / sum(w["seconds"] for w in ws)  # noqa: E731
    ratio = rate(loud) / rate(quiet)
    statuses = sorted({s for w in loud for s in w["statuses"]})
    return {"server": f"answered {', '.join(statuses)} to {sum(w['num_requests'] for w in loud)} "
                      f"requests; offline items/s {rate(loud):.1f} vs {rate(quiet):.1f} without "
                      f"({ratio:.2f}x); steps cut during the flood: "
                      f"{sum(w['cuts'] for w in loud)}; online latency samples: {samples:g}",
            "health": ["200"], "interruptions": 0, "offline_rate_ratio": round(ratio, 3),
            "windows": windows,
            **compare(finished(db_url, job_id), run.undisturbed(job))}


def _window(url: str, steps: Path, flood: bool, seconds: float) -> dict:
    items0, cuts0, t0 = _metric(url, "conserve_offline_items_total"), _cuts(steps), time.perf_counter()
    statuses = asyncio.run(_flood(url, 500, seconds)) if flood else []
    time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
    wall_s = time.perf_counter() - t0
    return {"flood": flood, "seconds": round(wall_s, 2), "num_requests": len(statuses),
            "statuses": sorted(set(statuses)), "cuts": _cuts(steps) - cuts0,
            "items": _metric(url, "conserve_offline_items_total") - items0}


async def _flood(url: str, num_requests: int, seconds: float) -> list[str]:
    """`num_requests` completions without the key, spread over `seconds`."""
    body = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 8, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one(i: int) -> str:
            await asyncio.sleep(i * seconds / num_requests)
            with contextlib.suppress(httpx.HTTPError):
                return str((await client.post("/v1/completions", json=body)).status_code)
            return "error"

        return await asyncio.gather(*(one(i) for i in range(num_requests)))


def _metric(url: str, name: str) -> float:
    text = http(url).get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _cuts(steps: Path) -> int:
    if not steps.exists():
        return 0
    return sum(1 for line in steps.read_text().splitlines() if '"aborted": true' in line)


def task_path(run: Run) -> dict:
    folder = run.folder("task-path")
    marker = folder / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "def docs(dataset):\n    return dataset\n")
    yaml = folder / "evil.yaml"
    yaml.write_text("task: evil\ndataset_path: json\ndataset_kwargs:\n  data_files: x.json\n"
                    "process_docs: !function evil.docs\ntest_split: train\n"
                    "doc_to_text: q\ndoc_to_target: a\noutput_type: generate_until\n")
    with run.server(folder, sqlite_url(folder)) as server:
        tries = {"the YAML's path": str(yaml), "a glob": "*", "a relative path": "../evil"}
        answers = {label: http(server.url).post("/v1/jobs", json={"tasks": [name]}).status_code
                   for label, name in tries.items()}
    return {"server": f"answered {answers}; code ran: {marker.exists()}", "health": ["200"],
            "interruptions": 0, "completed": None, "same_scores": None, "same_requests": None,
            "max_logprob_diff": None, "computed_twice": 0, "code_ran": marker.exists()}


def big_body(run: Run) -> dict:
    folder = run.folder("big-body")
    body = json.dumps({"model": "smollm2-135m", "prompt": "x" * 20_000_000}).encode()
    with run.server(folder, sqlite_url(folder)) as server:
        answers = {}
        for path in ("/v1/completions", "/v1/jobs", "/invocations"):
            with contextlib.suppress(httpx.HTTPError):
                answers[path] = http(server.url, timeout_s=120).post(
                    path, content=body, headers={"Content-Type": "application/json"}).status_code
        alive = httpx.get(f"{server.url}/health", timeout=10).status_code
    return {"server": f"answered {answers}; /health {alive} after", "health": [str(alive)],
            "interruptions": 0, "completed": None, "same_scores": None, "same_requests": None,
            "max_logprob_diff": None, "computed_twice": 0}


RUNNERS = {"sigkill-serve": sigkill_serve, "sigkill-engine-core": sigkill_engine_core,
           "outage-sqlite": lambda run: outage(run, "sqlite"),
           "outage-postgres": lambda run: outage(run, "postgresql"),
           "pump-exception": pump_exception, "migration-crash": migration_crash,
           "unauthenticated-flood": unauthenticated_flood, "task-path": task_path,
           "big-body": big_body}


def markdown(report: dict) -> str:
    lines = ["| fault | what the server did | /health seen | job completed | same scores | "
             "same requests (max diff) | computed twice (window) |", "|---|---|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        diff = row.get("max_logprob_diff")
        same = "n/a" if row.get("same_requests") is None else (
            f"{_yes(row['same_requests'])} ({diff:.1e})" if diff is not None else _yes(row["same_requests"]))
        window = MAX_INFLIGHT * row.get("interruptions", 0) or "-"
        lines.append(f"| {name} | {row['server']} | {', '.join(row['health']) or '-'} | "
                     f"{_yes(row['completed'])} | {_yes(row['same_scores'])} | {same} | "
                     f"{row['computed_twice']} ({window}) |")
    return "\n".join(lines)


def _yes(value) -> str:
    return "n/a" if value is None else ("yes" if value else "**no**")


def run_all() -> None:
    args = parse_args()
    run = Run(args)
    host = host_profile()
    report = {"window": MAX_INFLIGHT, "rows": {}}
    for name in args.rows.split(","):
        t0 = time.perf_counter()
        report["rows"][name] = {**RUNNERS[name](run), "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {report['rows'][name]['server']}", flush=True)
    write_measured("faults", report, args, host)
    print(markdown(report))


if __name__ == "__main__":
    run_all()
