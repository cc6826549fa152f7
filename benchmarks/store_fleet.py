"""The job store under a fleet: claim + commit throughput with 1-8 replica processes, side by side
on PostgreSQL and SQLite, and one big job through 8 replicas with nothing lost or done twice.

Each replica is a process running the job runner (`jobs.runner.Runner`, the window of `submit`:
64 items, commits of 32) as a heartbeating `jobs.replica.Replica`, on the fake engine with no
compute time: what is measured is the store alone. Reported per (database, replicas): items/s
over the whole job, and the store's cost per item (time inside store calls, summed over the
replicas, per item). PostgreSQL is a throwaway cluster started here (`store.pgcluster`, fsync
on: a real server's durability) unless `--pg-url` names one. Then `--big-items` items through
8 replicas: every item done, each claimed once, each completion counted once. Writes
benchmarks/measured/store_fleet.json. NOTE: the record's keys `workers` and `per_worker_items`,
the `--workers` flag and the table's words keep their first names, as the committed
measurement holds them: each counts replicas.

    python -m benchmarks.store_fleet --items 2000 --big-items 5000 --no-profile \
        --measured /tmp/store-fleet.json                                  # about a minute
    python -m benchmarks.store_fleet                                      # the measured run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_measured_args, md_table, measure_host, num, write_measured
from conserve_bench.config import JobSpec, RunConfig
from conserve_bench.store import Store, WorkItem

TARGET_STORE_MS = 2.0  # per item, at 8 replicas
WINDOW = RunConfig(max_inflight=64)


def replica_main(url: str, job_id: str, start, out) -> None:
    """One replica process: wait for the start, run the job's items to the end, report."""
    from conserve_bench.engine.fake import FakeEngine
    from conserve_bench.jobs.runner import Runner
    from conserve_bench.jobs.replica import Replica

    store = Store(url)
    with Replica(store, "bench") as replica:
        runner = Runner(store, FakeEngine(items_per_step=16), WINDOW, replica=replica)
        start.wait()
        runner.run(job_id, [])
    out.put({"num_items": runner.stats.num_items, "store_s": runner.stats.store_s,
             "wall_s": runner.stats.wall_s})


def run_job(url: str, num_items: int, num_replicas: int) -> dict:
    """A fresh job of `num_items` items through `num_replicas` processes; what it cost."""
    store = Store(url)
    job = store.create_job(JobSpec(tasks=("bench",), source="requests"))
    for first in range(0, num_items, 10_000):
        store.add_items(job.id, [WorkItem(f"{job.id}-{i:07d}", "loglikelihood", {"i": i})
                                 for i in range(first, min(num_items, first + 10_000))])
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=replica_main, args=(url, job.id, start, out)) for _ in range(num_replicas)]
    for proc in procs:
        proc.start()
    _wait_for_replicas(store, num_replicas)
    t0 = time.perf_counter()
    start.set()
    reports = [out.get(timeout=3600) for _ in procs]
    wall_s = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    return _summary(store, job.id, num_items, num_replicas, wall_s, reports)


def _wait_for_replicas(store: Store, num_replicas: int) -> None:
    deadline = time.time() + 300
    while len([w for w in store.live_replicas() if w["label"] == "bench"]) < num_replicas:
        if time.time() > deadline:
            raise RuntimeError("replicas did not start")
        time.sleep(0.2)


def _summary(store: Store, job_id: str, num_items: int, num_replicas: int, wall_s: float,
             reports: list[dict]) -> dict:
    runs = store.run_counts(job_id)
    committed = sum(r["num_items"] for r in reports)
    store_s = sum(r["store_s"] for r in reports)
    return {
        "database": store.dialect, "workers": num_replicas, "items": num_items,
        "wall_s": round(wall_s, 3), "items_per_s": round(num_items / wall_s, 1),
        "store_ms_per_item": round(1e3 * store_s / num_items, 4),
        "per_worker_items": sorted(r["num_items"] for r in reports),
        "lost": num_items - store.item_states(job_id).get("done", 0),
        "claimed_twice": sum(1 for n in runs.values() if n > 1),
        "completed_twice": committed - num_items,
    }


def databases(args) -> list[tuple[str, object]]:
    """(name, a callable giving a fresh database URL) for each database benchmarked."""
    folder = Path(tempfile.mkdtemp(prefix="store-fleet-"))
    counter = iter(range(10**6))
    found = [("sqlite", lambda: f"sqlite:///{folder / f'fleet{next(counter)}.db'}")]
    if args.pg_url:
        found.append(("postgresql", lambda: _fresh_pg_database(args.pg_url, next(counter))))
    else:
        from conserve_bench.store.pgcluster import ThrowawayCluster

        args.cluster = ThrowawayCluster(durable=True)
        found.append(("postgresql", args.cluster.create_database))
    return found


def _fresh_pg_database(url: str, n: int) -> str:
    import sqlalchemy as sa

    name = f"store_fleet_{int(time.time())}_{n}"
    with sa.create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    return str(sa.make_url(url).set(database=name).render_as_string(hide_password=False))


DATABASE_NAMES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}


def table(rows: list[dict]) -> str:
    """Replicas down, (items/s, store ms/item) of each database across."""
    names = sorted({r["database"] for r in rows})
    header = ["workers"] + [f"{DATABASE_NAMES.get(d, d)} {what}" for d in names
                            for what in ("items/s", "store ms/item")]
    cells = {(r["workers"], r["database"]): r for r in rows}
    return md_table(header, [[str(n)] + [cell for d in names for cell in _cells(cells.get((n, d)))]
                             for n in sorted({r["workers"] for r in rows})])


def _cells(row: dict | None) -> list[str]:
    return ["-", "-"] if row is None else [num(row["items_per_s"]), num(row["store_ms_per_item"], 2)]


def big_line(r: dict) -> str:
    wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.1f} s"
    rate = "" if r.get("items_per_s") is None else f" ({num(r['items_per_s'])} items/s)"
    verdict = "PASS" if r["store_ms_per_item"] < TARGET_STORE_MS else "FAIL"
    return (f"{DATABASE_NAMES.get(r['database'], r['database'])}: {num(r['items'])} items through "
            f"{r['workers']} workers in {wall}{rate}: lost {r['lost']}, claimed twice "
            f"{r['claimed_twice']}, completed twice {r['completed_twice']}; store "
            f"{r['store_ms_per_item']:.2f} ms/item (target < {TARGET_STORE_MS} ms: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000, help="Items per (database, replicas) run.")
    parser.add_argument("--workers", default="1,2,4,8", help="Numbers of replicas, comma-separated.")
    parser.add_argument("--big-items", type=int, default=100_000, help="Items of the 8-replica job.")
    parser.add_argument("--pg-url", help="An existing PostgreSQL (a database per run is created there).")
    add_measured_args(parser, "store_fleet")
    args = parser.parse_args()
    args.cluster = None
    host = measure_host(args)
    try:
        report = measure(args)
    finally:
        if args.cluster is not None:
            args.cluster.remove()
    write_measured("store_fleet", report, args, host)


def measure(args) -> dict:
    sweep, big = [], []
    for name, new_url in databases(args):
        for num_replicas in (int(n) for n in args.workers.split(",")):
            sweep.append(run_job(new_url(), args.items, num_replicas))
            print(json.dumps(sweep[-1]), flush=True)
        big.append(run_job(new_url(), args.big_items, 8))
        print(json.dumps(big[-1]), flush=True)
    print(f"\nclaim + commit, {args.items} items per run, fake engine (no compute):\n")
    print(table(sorted(sweep, key=lambda r: (r["workers"], r["database"]))))
    for r in big:
        print(f"\n{big_line(r)}")
    return {"sweep": sweep, "big": big, "target_store_ms_per_item": TARGET_STORE_MS}


if __name__ == "__main__":
    main()
