"""Leases, on SQLite and on a real PostgreSQL: expiry reclaimed inside the claim, the heartbeat,
the fence on (owner, attempt), failed attempts, replicas leaving a job, concurrent claims, and
claims and commits whose connection drops mid-transaction (PostgreSQL)."""

from __future__ import annotations

import contextlib
import threading

import psycopg
import pytest
import sqlalchemy as sa

from conserve_bench.config import JobSpec, LeaseConfig
from conserve_bench.jobs.replica import Replica
from conserve_bench.store import JobState, Store, WorkItem

from .conftest import dead_replica, wait_for

BOTH_DIALECTS = True
LEASE_S = 30.0  # NOTE: never runs out during a test: `expire` ends a lease when a test says so


def add_job(store, num_items: int) -> str:
    job = store.create_job(JobSpec(tasks=("t",), source="requests"))
    store.add_items(job.id, [WorkItem(f"k{i}", "loglikelihood", {"i": i}) for i in range(num_items)])
    return job.id


def as_replica(store, lease_s: float = LEASE_S, max_attempts: int = 3) -> Store:
    """The same database, seen by a replica whose claims last `lease_s`."""
    return Store(store.url, LeaseConfig(lease_s=lease_s, heartbeat_s=lease_s / 3,
                                        max_attempts=max_attempts))


def keys(work) -> list[str]:
    return [w.key for w in work]


def expire(store, owner: str) -> None:
    """`owner`'s leases run out now, as if it had stopped renewing them a lease ago."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("update items set lease_until = 0 where owner = :owner and state = 'running'"),
                     {"owner": owner})


def test_an_expired_lease_is_reclaimed_inside_the_next_claim(store):
    job_id = add_job(store, 4)
    dying = as_replica(store)
    assert keys(dying.claim_items(job_id, "dead", 2)) == ["k0", "k1"]
    assert keys(store.claim_items(job_id, "b", 4)) == ["k2", "k3"]  # k0, k1 are leased
    expire(store, "dead")
    taken = store.claim_items(job_id, "c", 4)
    assert [(w.key, w.attempt) for w in taken] == [("k0", 2), ("k1", 2)]
    assert dying.complete_items("dead", {"k0": "late"}, {"k0": 1}) == 0  # fenced off
    assert store.complete_items("c", {"k0": "c"}, {"k0": 2}) == 1
    assert store.results_for(["k0"]) == {"k0": "c"}


def test_the_heartbeat_keeps_a_lease_and_a_claim_never_takes_its_own(store):
    job_id = add_job(store, 3)
    replica = as_replica(store)
    held = keys(replica.claim_items(job_id, "w", 2))
    expire(store, "w")
    assert replica.renew_lease("w", held) == 2  # a beat in time: renewed for another lease
    assert keys(store.claim_items(job_id, "other", 3)) == ["k2"]
    expire(store, "w")  # beats missed
    assert replica.claim_items(job_id, "w", 3) == []  # expired, but its own: still computing
    assert keys(store.claim_items(job_id, "other", 3)) == ["k0", "k1"]


def test_a_heartbeat_skips_what_its_own_commit_holds_and_never_waits(pg_store):
    """A replica's heartbeat and its batched commit run on two connections at once: waiting on
    each other's row locks, they deadlocked (PostgreSQL broke it; seen in
    benchmarks/store_fleet.py). The rows a commit holds need no lease: the renewal skips them."""
    job_id = add_job(pg_store, 3)
    pg_store.claim_items(job_id, "w", 3)
    renewed = []
    with pg_store.engine.connect() as committing, committing.begin():
        committing.execute(sa.text("select key from items where key = 'k0' for update"))
        beat = threading.Thread(target=lambda: renewed.append(pg_store.renew_lease("w", HELD)))
        beat.start()
        beat.join(timeout=10)
        waited = beat.is_alive()
    beat.join()
    assert not waited and renewed == [2]  # k1 and k2; k0 is being committed
    assert pg_store.renew_lease("w", HELD) == 3


HELD = ("k0", "k1", "k2")


def test_a_heartbeat_renews_only_what_its_runners_track(store):
    """An item its runner lost track of (a give-back that failed in an outage) is left to
    expire: renewed for ever, it would never be reclaimed, since no claim takes its own."""
    job_id = add_job(store, 3)
    store.claim_items(job_id, "w", 3)
    expire(store, "w")
    assert store.renew_lease("w", ["k0", "k9"]) == 1  # k9: not held, nothing to renew
    assert keys(store.claim_items(job_id, "other", 3)) == ["k1", "k2"]
    assert store.renew_lease("w") == 0  # a replica whose runners hold nothing


def test_a_replica_heartbeat_leases_what_its_runner_holds_and_no_more(store):
    from conserve_bench.config import RunConfig
    from conserve_bench.engine.fake import FakeEngine
    from conserve_bench.jobs.runner import Runner, Stopped

    job_id = add_job(store, 4)
    stop = threading.Event()
    with Replica(store, "test") as replica:
        runner = Runner(store, FakeEngine(stall_after=0), RunConfig(max_inflight=2),
                        replica=replica, should_stop=stop.is_set)
        def run() -> None:
            with contextlib.suppress(Stopped):
                runner.run(job_id, [])

        running = threading.Thread(target=run)
        running.start()
        wait_for(lambda: len(replica.held_keys()) == 2, "the runner's claims")
        store.claim_items(job_id, replica.id, 1)  # held, but no runner knows of it
        assert replica.held_keys() == {"k0", "k1"}
        expire(store, replica.id)
        assert store.renew_lease(replica.id, replica.held_keys()) == 2
        assert keys(store.claim_items(job_id, "other", 4)) == ["k2", "k3"]  # k2: expired
        stop.set()
        running.join(10)
        runner.release()
    assert store.item_states(job_id) == {"pending": 2, "running": 2}  # other's k2, k3


def test_a_stale_attempt_is_fenced_off_even_for_the_same_owner(store):
    job_id = add_job(store, 1)
    short = as_replica(store, max_attempts=5)
    for owner, attempt in (("a", 1), ("b", 2), ("a", 3)):
        assert [(w.key, w.attempt) for w in short.claim_items(job_id, owner, 1)] == [("k0", attempt)]
        if attempt < 3:
            expire(store, owner)
    assert short.complete_items("b", {"k0": "b"}, {"k0": 2}) == 0
    assert short.complete_items("a", {"k0": "first"}, {"k0": 1}) == 0
    assert short.complete_items("a", {"k0": "third"}, {"k0": 3}) == 1
    assert store.results_for(["k0"]) == {"k0": "third"}


def test_an_item_that_fails_every_attempt_is_failed_with_its_error(store):
    job_id = add_job(store, 2)
    store = as_replica(store, lease_s=30, max_attempts=2)
    for attempt in (1, 2):
        claimed = {w.key: w.attempt for w in store.claim_items(job_id, "w", 2)}
        assert claimed["k0"] == attempt
        assert store.fail_items("w", {"k0": f"ValueError: bad {attempt}"}, claimed) == 1
        if "k1" in claimed:
            store.complete_items("w", {"k1": "ok"}, claimed)
    assert store.claim_items(job_id, "w", 2) == []
    assert store.item_errors(job_id) == [
        {"key": "k0", "kind": "loglikelihood", "error": "ValueError: bad 2", "attempts": 2}]
    job = store.get_job(job_id)
    assert (job.num_done, job.num_failed, job.to_dict()["failed"]) == (1, 1, 1)
    assert store.num_unfinished(job_id) == 0
    assert store.retry_failed_items(job_id) == 1  # an explicit resume
    assert keys(store.claim_items(job_id, "w", 2)) == ["k0"]


def test_an_item_whose_holders_keep_dying_is_failed_by_the_claim(store):
    job_id = add_job(store, 1)
    short = as_replica(store, max_attempts=2)
    short.claim_items(job_id, "d1", 1)
    expire(store, "d1")
    assert keys(short.claim_items(job_id, "d2", 1)) == ["k0"]  # first failed attempt
    expire(store, "d2")
    assert short.claim_items(job_id, "x", 1) == []  # second: out of attempts
    [failed] = store.item_errors(job_id)
    assert failed["error"] == "the lease of d2 expired" and failed["attempts"] == 2


def test_a_replica_started_on_this_host_ends_a_dead_neighbours_lease_at_once(store):
    job_id = add_job(store, 3)
    dead = dead_replica(store)
    store.claim_items(job_id, dead, 2)
    assert keys(store.claim_items(job_id, "other", 3)) == ["k2"]
    with Replica(store, "test") as replica:
        assert [w["id"] for w in store.live_replicas()] == [replica.id]
        assert keys(store.claim_items(job_id, replica.id, 3)) == ["k0", "k1"]
    assert store.live_replicas() == [] and store.item_states(job_id) == {"pending": 2, "running": 1}


def test_the_last_live_replica_leaving_a_job_sets_its_state(store):
    job_id = add_job(store, 1)
    for replica_id in ("w1", "w2"):
        store.register_replica(replica_id, "host", 1, "test")
        assert store.start_job(job_id, replica_id)
    store.leave_job(job_id, "w1", JobState.QUEUED, "drained")
    assert store.get_job_state(job_id) == JobState.RUNNING  # w2 is still on it
    assert store.job_status(job_id)[1] == []  # no item claimed yet
    store.leave_job(job_id, "w2", JobState.FAILED, "boom")
    job = store.get_job(job_id)
    assert (job.state, job.error) == (JobState.FAILED, "boom")
    assert not store.start_job(job_id, "w1", failed_too=False)  # a replica picked it running
    assert store.get_job_state(job_id) == JobState.FAILED
    assert store.start_job(job_id, "w1")  # `resume`
    store.set_job_state(job_id, JobState.CANCELLED)
    assert not store.start_job(job_id, "w1")


def test_job_replicas_shows_what_each_replica_computed_and_holds(store):
    job_id = add_job(store, 5)
    store.register_replica("w1", "host-a", 1, "serve :8000")
    for owner, n in (("w1", 3), ("w2", 2)):
        claimed = store.claim_items(job_id, owner, n)
        store.complete_items(owner, {w.key: 1 for w in claimed[:2]})
    assert store.job_status(job_id)[1] == [
        {"id": "w1", "host": "host-a", "label": "serve :8000", "live": True, "done": 2, "running": 1},
        {"id": "w2", "host": None, "label": None, "live": False, "done": 2, "running": 0}]


def test_racing_claims_share_every_item_once_and_take_at_most_what_they_ask(store):
    job_id = add_job(store, 120)
    sizes, errors = [], []

    def work(owner: str) -> None:
        try:
            while claimed := store.claim_items(job_id, owner, 7):
                sizes.append(len(claimed))
                store.complete_items(owner, {w.key: owner for w in claimed},
                                     {w.key: w.attempt for w in claimed})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and max(sizes) <= 7 and sum(sizes) == 120
    assert store.item_states(job_id) == {"done": 120}
    assert set(store.run_counts(job_id).values()) == {1}


# -- a connection that drops mid-transaction (a real PostgreSQL server, its backend killed) ---


@contextlib.contextmanager
def connection_dropped(store, at: str, marker: str):
    """Kill the server side of the store's connection once, in the transaction of the first
    statement containing `marker`: before it runs (`at="statement"`: rolled back), or right
    after its COMMIT went through (`at="commit"`: committed, but the client never hears)."""
    import sqlalchemy as sa

    state = {"armed": False, "fired": False}

    def kill(dbapi_connection) -> None:
        state["fired"] = True
        with psycopg.connect(store.url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (dbapi_connection.info.backend_pid,))

    def before_execute(conn, cursor, statement, *args):
        if marker in statement and not state["fired"]:
            if at == "statement":
                kill(cursor.connection)
            state["armed"] = True

    original = store.engine.dialect.do_commit

    def do_commit(dbapi_connection):
        original(dbapi_connection)
        if state["armed"] and at == "commit" and not state["fired"]:
            kill(dbapi_connection.dbapi_connection)
            dbapi_connection.dbapi_connection.execute("SELECT 1")  # raises: the server is gone

    sa.event.listen(store.engine, "before_cursor_execute", before_execute)
    store.engine.dialect.do_commit = do_commit
    try:
        yield state
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", before_execute)
        store.engine.dialect.do_commit = original
    assert state["fired"], "the connection was never dropped"


@pytest.mark.parametrize("at", ["statement", "commit"])
def test_a_claim_whose_connection_drops_is_retried_and_leaks_no_lease(pg_store, at):
    job_id = add_job(pg_store, 6)
    with connection_dropped(pg_store, at, "WITH expired"):
        claimed = pg_store.claim_items(job_id, "me", 2, held=[])
    assert len(claimed) == 2
    running = {i["key"] for i in pg_store.job_items(job_id) if i["state"] == "running"}
    assert running == set(keys(claimed))  # what an unseen commit took was given back
    assert pg_store.complete_items("me", {w.key: 1 for w in claimed},
                                   {w.key: w.attempt for w in claimed}) == 2


@pytest.mark.parametrize("at", ["statement", "commit"])
def test_a_commit_whose_connection_drops_is_retried_and_counted_once(pg_store, at):
    job_id = add_job(pg_store, 3)
    claimed = pg_store.claim_items(job_id, "me", 3)
    with connection_dropped(pg_store, at, "finished_at"):
        assert pg_store.complete_items("me", {w.key: w.key for w in claimed},
                                       {w.key: w.attempt for w in claimed}) == 3
    assert pg_store.item_states(job_id) == {"done": 3}
    assert pg_store.results_for(["k0"]) == {"k0": "k0"}


def test_replicas_starting_together_migrate_a_blank_database_once(postgres):
    import sqlalchemy as sa

    from conserve_bench.store import MIGRATIONS

    url = postgres.create_database()
    errors: list[Exception] = []

    def open_store() -> None:
        try:
            Store(url).engine.dispose()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        versions = conn.execute(sa.text("select version from schema_version")).scalars().all()
    engine.dispose()
    postgres.drop_database(url)
    assert not errors and versions == [len(MIGRATIONS)]
