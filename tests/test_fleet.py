"""Fleet mode on a real PostgreSQL: replica processes (`serve`'s pump on the fake engine, see
tests/fleet_replica.py) share one job. Every item is computed, the results are those of a
single replica, and only what a replica held when it died (or drained) is claimed again.

SIGKILL: the dead replica's items wait out its lease, then the others take them. SIGTERM:
the replica gives its items back and the job goes on. A poisoned item fails after N attempts,
visible in `status`. A database restart: the replicas reconnect and lose nothing. The real
engine in a fleet of two `serve`s is tests/test_server.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from conserve_bench.engine.fake import FAKE_FINGERPRINT, FakeEngine, fake_result
from conserve_bench.jobs.lifecycle import run_job, submit_requests
from conserve_bench.store import Store

from .conftest import REPO, TEST_TASKS, cli, wait_for

MAX_INFLIGHT = 8


def requests_job(store: Store, num_items: int):
    work = [("loglikelihood_rolling", [f"text {i}"]) for i in range(num_items)]
    job, _ = submit_requests(store, work, FAKE_FINGERPRINT, "fake-model")
    return job


def results(store: Store, job_id: str) -> dict[str, object]:
    return {i["key"]: i["result"] for i in store.job_items(job_id)}


def single_replica_results(tmp_path, num_items: int) -> dict[str, object]:
    store = Store(f"sqlite:///{tmp_path / 'single.db'}")
    job = requests_job(store, num_items)
    run_job(store, job.id, FakeEngine(), output_dir=None)
    return results(store, job.id)


def recomputed(store: Store, job_id: str) -> int:
    """Claims beyond the first, over the job's items."""
    return sum(n - 1 for n in store.run_counts(job_id).values())


class Fleet:
    """`num` fake-engine replicas on `url`, each a process; all stopped (SIGTERM, then SIGKILL)
    on exit."""

    def __init__(self, store: Store, num: int, *flags: str):
        self.store = store
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "tests.fleet_replica", store.url, "--max-inflight",
             str(MAX_INFLIGHT), *flags], cwd=REPO, stderr=subprocess.PIPE, text=True)
            for _ in range(num)]
        wait_for(self._all_live, f"{num} live replicas", timeout_s=120, poll_s=0.2)

    def _all_live(self) -> bool:
        for proc in self.procs:
            assert proc.poll() is None, proc.stderr.read()
        return {w["pid"] for w in self.store.live_replicas()} >= {p.pid for p in self.procs}

    def replica_id(self, proc) -> str:
        return next(w["id"] for w in self.store.live_replicas() if w["pid"] == proc.pid)

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_done(store: Store, job_id: str, timeout_s: float = 120) -> None:
    def done() -> bool:
        job = store.get_job(job_id)
        assert job.state not in ("failed", "cancelled"), job
        return job.state == "done"

    wait_for(done, f"job {job_id}", timeout_s, poll_s=0.1)


def wait_progress(store: Store, job_id: str, fraction: float) -> None:
    wait_for(lambda: store.get_job(job_id).num_done >= fraction * store.get_job(job_id).num_total,
             f"{fraction:.0%} of job {job_id}", timeout_s=120, poll_s=0.02)


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_replicas_share_one_job_with_the_results_of_a_single_replica(pg_store, tmp_path, num_replicas):
    with Fleet(pg_store, num_replicas, "--step-s", "0.02") as fleet:
        live = json.loads(cli("jobs", "--db", pg_store.url, "--json").stdout)["replicas"]
        assert {r["pid"] for r in live} == {p.pid for p in fleet.procs}
        job = requests_job(pg_store, 240)
        wait_done(pg_store, job.id)
    assert results(pg_store, job.id) == single_replica_results(tmp_path, 240)
    assert recomputed(pg_store, job.id) == 0  # no replica died
    status = json.loads(cli("status", job.id, "--db", pg_store.url, "--json").stdout)
    assert (status["state"], status["done"], status["failed"]) == ("done", 240, 0)
    replicas = status["replicas"]
    assert len(replicas) == num_replicas and all(r["done"] > 0 for r in replicas)  # all at once
    assert sum(r["done"] for r in replicas) == 240 and not any(r["running"] for r in replicas)


def test_a_sigkilled_replicas_items_are_reclaimed_after_its_lease(pg_store, tmp_path):
    job = requests_job(pg_store, 200)
    with Fleet(pg_store, 2, "--step-s", "0.02", "--lease-s", "1.5", "--heartbeat-s", "0.3") as fleet:
        victim = fleet.procs[0]
        victim_id = fleet.replica_id(victim)
        wait_progress(pg_store, job.id, 0.3)
        victim.kill()
        victim.wait()
        held = next(r["running"] for r in pg_store.job_status(job.id)[1] if r["id"] == victim_id)
        assert 0 < held <= MAX_INFLIGHT
        wait_done(pg_store, job.id)
        assert victim_id not in {w["id"] for w in pg_store.live_replicas()}
    assert results(pg_store, job.id) == single_replica_results(tmp_path, 200)
    assert recomputed(pg_store, job.id) == held  # exactly the dead replica's window


def test_sigterm_drains_one_replica_and_the_others_carry_on(pg_store, tmp_path):
    job = requests_job(pg_store, 200)
    with Fleet(pg_store, 2, "--step-s", "0.02") as fleet:
        drained = fleet.procs[0]
        drained_id = fleet.replica_id(drained)
        wait_progress(pg_store, job.id, 0.3)
        drained.send_signal(signal.SIGTERM)
        assert drained.wait(timeout=30) == 0
        mine = [r for r in pg_store.job_status(job.id)[1] if r["id"] == drained_id]
        assert mine and mine[0]["running"] == 0 and not mine[0]["live"]
        assert pg_store.get_job_state(job.id) == "running"  # the other replica's
        wait_done(pg_store, job.id)
    assert results(pg_store, job.id) == single_replica_results(tmp_path, 200)
    assert recomputed(pg_store, job.id) <= MAX_INFLIGHT


def test_a_poisoned_item_fails_after_its_attempts_and_status_shows_it(pg_store):
    job = requests_job(pg_store, 40)
    poisoned = pg_store.job_items(job.id)[7]["key"]
    with Fleet(pg_store, 2, "--poison", poisoned, "--max-attempts", "2"):
        wait_for(lambda: pg_store.get_job_state(job.id) == "failed", "the job to fail", 120)
    assert pg_store.item_states(job.id) == {"done": 39, "failed": 1}
    assert pg_store.run_counts(job.id)[poisoned] == 2
    shown = cli("status", job.id, "--db", pg_store.url)
    assert shown.returncode == 0
    assert "39/40 items, 1 failed" in shown.stdout and "ItemsFailedError" in shown.stdout
    assert f"failed loglikelihood_rolling {poisoned[:12]} after 2 attempts: FakeEngineError" in shown.stdout


def test_a_database_restart_mid_job_loses_nothing(pg_store, postgres, tmp_path):
    job = requests_job(pg_store, 200)
    with Fleet(pg_store, 2, "--step-s", "0.02", "--lease-s", "10", "--heartbeat-s", "1") as fleet:
        wait_progress(pg_store, job.id, 0.3)
        postgres.restart(mode="immediate")  # like a crash: recovery from the WAL
        wait_done(pg_store, job.id)
        assert all(proc.poll() is None for proc in fleet.procs)  # they rode it out
    assert results(pg_store, job.id) == single_replica_results(tmp_path, 200)
    assert recomputed(pg_store, job.id) <= 2 * MAX_INFLIGHT


def test_submit_no_wait_records_a_task_job_that_the_replicas_run_together(pg_store):
    """An lm-eval task over the fake engine: each replica builds its requests, they share the
    items, one job's scores result."""
    tasks = str(TEST_TASKS / "conserve_tiny_gen.yaml")
    with Fleet(pg_store, 2, "--step-s", "0.2", "--items-per-step", "1"):
        queued = cli("submit", tasks, "--db", pg_store.url, "--no-wait", "--json")
        assert queued.returncode == 0, queued.stderr
        job = json.loads(queued.stdout)
        assert job["state"] == "queued"
        wait_done(pg_store, job["id"])
    done = pg_store.get_job(job["id"])
    assert done.num_done == done.num_total == 10
    assert sum(r["done"] for r in pg_store.job_status(job["id"])[1]) == 10
    assert all(i["result"] == fake_result(i["key"], i["kind"]) for i in pg_store.job_items(job["id"]))
    assert "exact_match,none" in pg_store.get_results(job["id"])["results"]["conserve_tiny_gen"]
