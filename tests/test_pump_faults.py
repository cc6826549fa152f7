"""The offline pump through faults, on the fake engine: a dead engine, a store that fails or
is down for several leases, an injected fault. No job is stuck and none is failed for what
was not its fault; `health()` says when the pump or its heartbeat is down."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from conserve_bench import faults
from conserve_bench.config import LeaseConfig, RunConfig
from conserve_bench.engine.fake import FakeEngine, FakeEngineError
from conserve_bench.errors import EngineUnavailableError
from conserve_bench.jobs.lifecycle import run_job
from conserve_bench.serve import pump as pump_module
from conserve_bench.serve.pump import OfflinePump
from conserve_bench.store import Store

from .conftest import wait_for
from .test_pump import WINDOW, requests_job, running, wait_done

BOTH_DIALECTS = True
LEASE = LeaseConfig(lease_s=1.0, heartbeat_s=0.2)


@pytest.fixture(autouse=True)
def _quick_pump(monkeypatch):
    monkeypatch.setattr(pump_module, "IDLE_POLL_S", 0.01)
    yield
    faults.arm("")  # NOTE: disarm whatever a test armed


def down(health):
    """A condition for `wait_for`: the (False, reason) of `health()`, once it is down."""
    def check():
        ok, reason = health()
        return None if ok else (ok, reason)

    return check


class DyingEngine(FakeEngine):
    """The fake engine whose engine core dies once `die_after` items finished: from then on
    `step` raises, and `is_dead` says so, as `AsyncEngineAdapter` does over a dead AsyncLLM."""

    def __init__(self, die_after: int, **kwargs):
        super().__init__(**kwargs)
        self.die_after, self.is_dead = die_after, False

    def step(self):
        if self.num_finished >= self.die_after:
            self.is_dead = True
            raise EngineUnavailableError("the server's engine died")
        return super().step()


def test_a_dead_engine_gives_its_job_back_fails_no_job_and_downs_the_pump(store):
    """Before: the job failed, then every queued job after it, one by one, at once."""
    first, second = requests_job(store, 20, "a"), requests_job(store, 10, "b")
    reasons = []
    pump = OfflinePump(store, DyingEngine(die_after=6, items_per_step=2), WINDOW,
                       output_dir=None, on_fatal=reasons.append)
    with running(pump):
        wait_for(lambda: pump.fatal, "the pump to go down", timeout_s=30)
        wait_for(lambda: not pump._thread.is_alive(), "the pump's thread to end", timeout_s=10)
        ok, reason = pump.health()
    assert not ok and "engine" in reason and reasons == [reason] == [pump.fatal]
    given_back = store.get_job(first.id)
    assert given_back.state == "queued" and given_back.error.startswith("EngineUnavailableError")
    assert store.item_states(first.id) == {"done": 6, "pending": 14}
    assert store.get_job(second.id).state == "queued"
    assert store.item_states(second.id) == {"pending": 10}


def test_a_job_is_never_failed_for_an_error_that_surfaced_as_its_engine_died(store):
    """However the death surfaced (here the fake's own error), an engine that says it is
    dead is infrastructure: the job is queued again for a restarted server."""
    job = requests_job(store, 12)
    engine = FakeEngine(fail_after=4)
    engine.is_dead = True
    with pytest.raises(FakeEngineError):
        run_job(store, job.id, engine, output_dir=None)
    assert store.get_job(job.id).state == "queued"
    assert store.item_states(job.id) == {"done": 4, "pending": 8}


def test_the_pump_survives_any_error_of_its_store_and_runs_the_job(store, monkeypatch):
    """Before: one error looking for the next job (anything but StoreUnavailableError) ended
    the pump's thread for good, and nothing ran until the server restarted."""
    job = requests_job(store, 8)
    next_runnable_job, num_errors = store.next_runnable_job, []

    def failing(*args, **kwargs):
        if len(num_errors) < 3:
            num_errors.append(1)
            raise sa.exc.ProgrammingError("SELECT ...", {}, Exception("no such column"))
        return next_runnable_job(*args, **kwargs)

    monkeypatch.setattr(store, "next_runnable_job", failing)
    pump = OfflinePump(store, FakeEngine(), WINDOW, output_dir=None)
    with running(pump):
        wait_done(store, job, timeout_s=30)
        assert pump.health() == (True, None)
    assert len(num_errors) == 3 and store.item_states(job.id) == {"done": 8}


def test_an_injected_fault_at_the_next_job_is_survived_then_the_job_runs(store):
    faults.arm("pump.next_job:3")
    job = requests_job(store, 8)
    with running(OfflinePump(store, FakeEngine(), WINDOW, output_dir=None)) as pump:
        wait_done(store, job, timeout_s=30)
        assert pump.health() == (True, None)
    assert faults._armed.remaining == {"pump.next_job": 0}  # every fault fired
    assert store.item_states(job.id) == {"done": 8}


def test_a_pump_failing_for_longer_than_a_lease_reports_itself_down_then_recovers(store):
    faults.arm("pump.next_job")  # every time, until disarmed
    leased = Store(store.url, LEASE)
    job = requests_job(leased, 4)
    with running(OfflinePump(leased, FakeEngine(), WINDOW, output_dir=None)) as pump:
        assert pump.health() == (True, None)  # a failure, but not yet for a lease
        ok, reason = wait_for(down(pump.health), "health down", 10)
        assert "InjectedFault: injected fault at pump.next_job" in reason
        assert pump.fatal is None and pump.replica.health() == (True, None)  # the store is fine
        faults.arm("")
        wait_done(leased, job, timeout_s=30)  # NOTE: the backoff is capped
        # NOTE: the turn that ran the job clears the failure once it returns, just after the
        # job is done
        wait_for(lambda: pump.health() == (True, None), "health back up", 5)


class Outage:
    """Every transaction of `store` fails as a database that is unreachable (SQLite's writer
    lock held for good: a transient error), from `start()` until `end()`, and for `min_s` at
    least; the store's own retries run as for a real outage, and give up after a lease.

    NOTE: it ends when the test has seen what it waits for, not on a clock: on a loaded
    2-core host the heartbeat and the pump reported it later than a fixed 4 s outage lasted."""

    def __init__(self, store: Store, min_s: float):
        self.min_s, self.started, self.until = min_s, None, float("inf")
        retrying = store._retrying
        store._retrying = lambda fn: retrying(lambda retry: self._check() or fn(retry))

    def start(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def end(self) -> None:
        self.until = max(self.started + self.min_s, time.monotonic())

    @property
    def is_on(self) -> bool:
        return self.started is not None and time.monotonic() < self.until

    def _check(self) -> None:
        if self.is_on:
            raise sa.exc.OperationalError("UPDATE items ...", {},
                                          sqlite3.OperationalError("database is locked"))


def test_a_store_outage_of_several_leases_mid_job_leaves_nothing_stuck(store):
    """Before: the runner's give-back failed in the outage, its items stayed running under
    the pump's replica, its heartbeat renewed them for ever, and no claim takes its own: the
    job waited for ever (probed: 192/200 done)."""
    leased = Store(store.url, LEASE)
    job = requests_job(leased, 200)
    outage = Outage(leased, min_s=4 * LEASE.lease_s)
    engine = FakeEngine(items_per_step=2, step_s=0.005,
                        on_step=lambda: engine.num_finished >= 40 and outage.start())
    reasons = []
    pump = OfflinePump(leased, engine, RunConfig(max_inflight=8), output_dir=None,
                       on_fatal=reasons.append)
    with running(pump):
        wait_for(lambda: outage.is_on, "the outage", timeout_s=30)
        ok, reason = wait_for(down(pump.replica.health),
                              "the heartbeat to report the store down", timeout_s=10)
        assert "renewed no lease" in reason
        ok, reason = wait_for(down(pump.health),
                              "the pump to report itself down", timeout_s=10)
        assert "StoreUnavailableError" in reason
        outage.end()  # NOTE: after 4 leases at least: every lease the pump held expired in it
        wait_done(store, job, timeout_s=60)
        assert pump.health() == (True, None) and pump.replica.health() == (True, None)
    assert reasons == [] and store.item_states(job.id) == {"done": 200}
    runs = store.run_counts(job.id)
    assert sum(n - 1 for n in runs.values()) <= 8  # only what was in flight is computed again


def test_the_async_engine_reports_a_dead_engine_as_unavailable():
    """vLLM's EngineDeadError (`generate`, once the engine core died) and a dead AsyncLLM
    (`errored`) are the engine's failure, never a request's."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from conserve_bench.engine.async_llm import AsyncEngineAdapter, _request_error

    with pytest.raises(EngineUnavailableError, match="the server's engine died: EngineDeadError"):
        _request_error(EngineDeadError())
    refused = ValueError("max_tokens must be at least 1")
    assert _request_error(refused) is refused  # the request's alone: its items fail
    client = SimpleNamespace(get_tokenizer=lambda: SimpleNamespace(decode=str), errored=False)
    loop = asyncio.new_event_loop()
    try:
        engine = AsyncEngineAdapter(client, loop, "f", 2048)
        assert not engine.is_dead and engine.step() == []
        client.errored = True
        assert engine.is_dead
        with pytest.raises(EngineUnavailableError):
            engine.step()
        with pytest.raises(EngineUnavailableError):
            engine.submit([])
    finally:
        loop.close()


def test_a_heartbeat_survives_any_error_and_reports_itself_down_meanwhile(store, monkeypatch):
    from conserve_bench.jobs.replica import Replica

    leased = Store(store.url, LEASE)
    broken = threading.Event()
    renew_lease = leased.renew_lease

    def renew(*args):
        if broken.is_set():
            raise RuntimeError("a bug in the heartbeat")
        return renew_lease(*args)

    monkeypatch.setattr(leased, "renew_lease", renew)
    with Replica(leased, "test") as replica:
        assert replica.health() == (True, None)
        broken.set()
        ok, reason = wait_for(down(replica.health),
                              "the heartbeat to report itself down", timeout_s=5)
        assert "RuntimeError: a bug in the heartbeat" in reason
        broken.clear()
        wait_for(lambda: replica.health() == (True, None), "the heartbeat back", timeout_s=5)
        assert replica._thread.is_alive()
    assert replica.health() == (False, f"replica {replica.id} is stopped")


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success():
    """The waits the heartbeat and the pump retry by (`jobs.replica.Backoff`)."""
    from conserve_bench.jobs.replica import Backoff

    backoff = Backoff(0.1, 0.5)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1
    assert Backoff(0.1, 0.05).next() == 0.05  # never a first wait past the cap (a short beat)
