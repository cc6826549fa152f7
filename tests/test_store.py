"""The store on SQLite and PostgreSQL: schema and frozen migrations, item dedupe, claims,
batched commits (leases, fencing and outages: tests/test_leases.py)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.config import JobSpec, LeaseConfig
from conserve_bench.errors import DatabaseURLError, JobNotFoundError
from conserve_bench.store import MIGRATIONS, JobState, Store, WorkItem
from conserve_bench.store.db import create_engine
from conserve_bench.store.migrations import migrate
from conserve_bench.store.repository import ANALYZE_AFTER_ITEMS
from conserve_bench.store.schema import metadata


BOTH_DIALECTS = True  # every test taking `store` runs on SQLite and on PostgreSQL

EXPECTED_SCHEMA = {
    "schema_version": {"version"},
    "jobs": {"id", "state", "spec", "num_total", "results", "error", "created_at",
             "updated_at", "run_s", "run_key", "progress"},
    "items": {"key", "kind", "args", "state", "result", "owner", "claimed_at", "finished_at",
              "num_runs", "seq", "lease_until", "num_failures", "error"},
    "job_items": {"job_id", "item_key", "seq"},
    "profiles": {"model", "dtype", "device", "vllm_version", "parallel_size", "model_json",
                 "num_samples", "fit_error", "created_at"},
    "profile_refits": {"model", "dtype", "device", "vllm_version", "parallel_size", "state_json",
                       "created_at"},
    "workers": {"id", "host", "pid", "label", "state", "started_at", "heartbeat_at",
                "lease_until", "job_id"},
    "item_partials": {"item_key", "token_ids", "num_tokens", "num_resumes", "num_reused_tokens",
                      "updated_at"},
    "files": {"id", "purpose", "filename", "num_bytes", "content", "created_at"},
    "batches": {"id", "job_id", "endpoint", "input_file_id", "completion_window", "status",
                "num_lines", "line_errors", "metadata", "errors", "output_file_id",
                "error_file_id", "created_at", "expires_at", "in_progress_at", "finalizing_at",
                "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "usage",
                "request_counts"},
}


def items_for(n, kind="loglikelihood", prefix="k"):
    return [WorkItem(f"{prefix}{i}", kind, {"i": i}) for i in range(n)]


def test_blank_database_migrates_to_expected_schema(new_db_url):
    url = new_db_url()
    engine = Store(url).engine
    inspector = sa.inspect(engine)
    schema = {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}
    assert schema == EXPECTED_SCHEMA
    with engine.connect() as conn:
        assert conn.execute(sa.text("select version from schema_version")).scalar() == len(MIGRATIONS)
        if engine.dialect.name == "sqlite":
            assert conn.execute(sa.text("pragma journal_mode")).scalar() == "wal"


def schema_of(engine) -> dict:
    """Every table as the database reports it: columns in order (name, type, nullable,
    default), primary key, foreign keys, indexes."""
    inspector = sa.inspect(engine)
    return {table: {
        "columns": [(c["name"], str(c["type"]), c["nullable"], c["default"])
                    for c in inspector.get_columns(table)],
        "pk": inspector.get_pk_constraint(table)["constrained_columns"],
        "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"])
                      for f in inspector.get_foreign_keys(table)),
        "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                          for i in inspector.get_indexes(table)),
    } for table in inspector.get_table_names()}


@pytest.mark.parametrize("old_version", range(1, len(MIGRATIONS)))
def test_an_old_store_migrates_to_exactly_the_schema_of_a_blank_one(new_db_url, old_version):
    """Frozen migrations: a store made by the first migrations only, holding a job with a
    half-done item list, is upgraded in place on open, to the schema a blank store gets,
    which is the schema the queries are written against; its items stay claimable."""
    old_url = new_db_url()
    old = create_engine(old_url)
    assert migrate(old, MIGRATIONS[:old_version]) == old_version
    with old.begin() as conn:  # a job as the first schema stored it, one item done
        conn.execute(sa.text("insert into jobs (id, state, spec, num_total, created_at, "
                             "updated_at, run_s) values ('j1', 'running', :spec, 3, 1.0, 1.0, 0.0)"),
                     {"spec": '{"tasks": ["mmlu"]}'})
        for seq, (key, state) in enumerate([("b", "done"), ("c", "pending"), ("a", "pending")]):
            conn.execute(sa.text("insert into items (key, kind, args, state, num_runs) "
                                 "values (:k, 'loglikelihood', '{}', :s, 0)"), {"k": key, "s": state})
            conn.execute(sa.text("insert into job_items (job_id, item_key, seq) values ('j1', :k, :q)"),
                         {"k": key, "q": seq})
    upgraded = Store(old_url)  # migrates on open
    assert upgraded.get_job("j1").spec.tasks == ("mmlu",)
    assert [w.key for w in upgraded.claim_items("j1", "me", 5)] == ["c", "a"]  # job order

    blank = Store(new_db_url()).engine
    current = create_engine(new_db_url())
    metadata.create_all(current)
    assert schema_of(old) == schema_of(blank) == schema_of(current)
    with old.connect() as conn:
        assert conn.execute(sa.text("select version from schema_version")).scalar() == len(MIGRATIONS)
    for engine in (old, blank, current):
        engine.dispose()


def test_a_run_key_names_one_job_and_many_jobs_have_none(store):
    first = store.create_job(JobSpec(tasks=("a",)), run_key="2024-06-01-abc")
    again = store.create_job(JobSpec(tasks=("other",)), run_key="2024-06-01-abc")
    assert again.id == first.id and again.spec.tasks == ("a",)  # the caller compares specs
    assert store.job_by_run_key("2024-06-01-abc").to_dict()["run_key"] == "2024-06-01-abc"
    assert store.job_by_run_key("nope") is None
    unnamed = [store.create_job(JobSpec(tasks=("a",))) for _ in range(2)]
    assert len({j.id for j in unnamed} | {first.id}) == 3


def test_a_requests_job_is_never_runnable_without_its_items(store, monkeypatch):
    """A fleet replica runs the oldest queued job: seen before its items were attached, it
    would end done with none of them computed (a CI failure with four replicas)."""
    from conserve_bench.jobs.lifecycle import submit_requests

    seen = []
    write = store._write

    def checked(fn):
        out = write(fn)
        if (job := store.next_runnable_job()) is not None:  # what another replica would read
            seen.append(job.num_total)
        return out

    monkeypatch.setattr(store, "_write", checked)
    job, keys = submit_requests(store, [("loglikelihood", ["a", " b"])] * 2 + [
        ("loglikelihood", ["c", " d"])], "fp", "m")
    assert (job.state, job.num_total, len(keys)) == ("queued", 2, 3)
    assert seen and set(seen) == {2}


def test_reopening_keeps_data_and_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    job = Store(url).create_job(JobSpec(tasks=("mmlu",)))
    assert Store(url).get_job(job.id).spec.tasks == ("mmlu",)


def test_items_are_shared_across_jobs_and_deduplicated(store):
    a = store.create_job(JobSpec(tasks=("t",)))
    b = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(a.id, items_for(3))
    store.add_items(a.id, items_for(3))  # rebuilding the same job adds nothing
    store.add_items(b.id, items_for(5))
    claimed = store.claim_items(a.id, "me", limit=10)
    store.complete_items("me", {w.key: [-1.0, True] for w in claimed})
    assert store.get_job(a.id).num_total == 3
    assert (store.get_job(b.id).num_done, store.get_job(b.id).num_total) == (3, 5)
    assert [w.key for w in store.claim_items(b.id, "me", limit=10)] == ["k3", "k4"]


def test_a_jobs_progress_counts_its_own_items_by_state_owner_and_saved_tokens(store):
    """What `status` and `GET /v1/jobs/{id}` show: each job counts the items linked to it
    (one item shared by two jobs counts in both), and an unfinished item's saved tokens."""
    a = store.create_job(JobSpec(tasks=("t",)))
    b = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(a.id, items_for(4, "generate_until"))
    store.add_items(b.id, items_for(2, "generate_until") + items_for(3, "generate_until", "b"))
    store.claim_items(a.id, "r1", 3)  # k0, k1, k2
    store.complete_items("r1", {"k0": "x", "k1": "y"})
    assert store.save_partials("r1", {"k2": [1, 2, 3]}) == 1
    store.claim_items(b.id, "r2", 1)  # b0 (k0 and k1 are done)
    job_a, job_b = store.get_job(a.id), store.get_job(b.id)
    assert (job_a.num_done, job_a.num_total, job_a.num_partial_items, job_a.num_partial_tokens) == (2, 4, 1, 3)
    assert (job_b.num_done, job_b.num_total, job_b.num_partial_items, job_b.num_partial_tokens) == (2, 5, 0, 0)
    assert [(j.id, j.num_done) for j in store.list_jobs()] == [(b.id, 2), (a.id, 2)]
    assert {(r["id"], r["done"], r["running"]) for r in store.job_status(b.id)[1]} == {("r1", 2, 0), ("r2", 0, 1)}
    assert store.job_status(a.id)[0] == job_a


def test_a_done_jobs_counts_stay_with_its_results_and_a_list_counts_only_live_jobs(store):
    """A nightly store keeps every night's job, and `jobs` / `GET /v1/jobs` list up to 100:
    each counted its items (35 ms of CPU for an MMLU job) on the CPU the engine's steps run
    on. A done job's counts are written with its results: what they were computed from,
    even once a job sharing its failed item retries that item."""
    done = store.create_job(JobSpec(tasks=("t",)))
    live = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(done.id, items_for(3))
    store.add_items(live.id, items_for(4))  # k0-k2 shared
    store.claim_items(done.id, "r", 2)
    store.complete_items("r", {"k0": "x", "k1": "y"})
    once = Store(store.url, LeaseConfig(max_attempts=1))
    once.claim_items(done.id, "r", 1)
    assert once.fail_items("r", {"k2": "boom"}) == 1
    assert store.save_results(done.id, {"results": {}})
    store.retry_failed_items(live.id)  # k2 back to pending: the live job's to run
    statements = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, sql, params, *_: statements.append((sql, str(params))))
    listed = {j.id: (j.state, j.num_done, j.num_failed, j.num_total) for j in store.list_jobs()}
    assert listed == {done.id: (JobState.DONE, 2, 1, 3), live.id: (JobState.QUEUED, 2, 0, 4)}
    (counted,) = [params for sql, params in statements if "job_items" in sql]
    assert live.id in counted and done.id not in counted
    assert store.job_status(done.id)[0].num_failed == 1 and store.get_job(done.id).num_done == 2
    assert store.job_spec(done.id) == done.spec


def test_a_status_poll_reads_an_index_of_the_items_never_their_rows(tmp_path):
    """An item's row holds its prompt and result; a status poll that read them (11,000 for a
    `mmlu --limit 50` job: 80 ms of CPU a `GET /v1/jobs/{id}`) took its time from the online
    requests' steps. On SQLite every read of `items` a poll makes is covered by an index,
    once a job's items have brought statistics; and a claim still walks its own index."""
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, items_for(ANALYZE_AFTER_ITEMS))
    store.complete_items("me", {w.key: "done" for w in store.claim_items(job.id, "me", 10)})
    statements = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, sql, params, *_: statements.append((sql, params)))
    store.get_job(job.id), store.list_jobs(), store.job_status(job.id)
    polls = [(sql, params) for sql, params in statements if "items" in sql]
    num_polled = len(statements)
    store.claim_items(job.id, "me", 10)
    (claim,) = [(sql, params) for sql, params in statements[num_polled:] if "UPDATE items" in sql]

    def plan(sql, params) -> list[str]:
        with store.engine.connect() as conn:
            return [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]

    reads = [step for sql, params in polls for step in plan(sql, params)
             if step.startswith(("SCAN items", "SEARCH items"))]
    assert reads and all("COVERING INDEX" in step for step in reads), reads
    assert any("ix_items_claim" in step for step in plan(*claim))


def test_claims_follow_job_order_and_kind(store):
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, items_for(4, "generate_until", "g") + items_for(2))
    assert [w.key for w in store.claim_items(job.id, "me", 3, kind="generate_until")] == ["g0", "g1", "g2"]
    assert [w.key for w in store.claim_items(job.id, "me", 3, kind="loglikelihood")] == ["k0", "k1"]
    assert store.claim_items(job.id, "other", 3, kind="loglikelihood") == []


def test_only_the_owner_holding_an_item_completes_it(store):
    """The fence fleet mode builds on: a replica presumed dead cannot overwrite the result of
    the replica that took its items over, nor complete items it never claimed."""
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, items_for(4))
    store.claim_items(job.id, "a", 2)  # k0, k1
    assert store.complete_items("b", {"k0": "b", "k1": "b"}) == 0  # held by a
    assert store.complete_items("a", {"k0": "a", "k2": "a"}) == 1  # k2 is pending, not a's
    store.release_items("a")  # a presumed dead: k1 back to pending
    assert [w.key for w in store.claim_items(job.id, "b", 4)] == ["k1", "k2", "k3"]
    assert store.complete_items("a", {"k1": "late"}) == 0
    assert store.complete_items("b", {"k1": "b", "k2": "b", "k3": "b"}) == 3
    assert store.complete_items("b", {"k1": "again"}) == 0  # done already
    assert store.results_for(["k0", "k1"]) == {"k0": "a", "k1": "b"}
    assert store.item_states(job.id) == {"done": 4}


def test_job_states_are_stored_as_their_names(store):
    job = store.create_job(JobSpec(tasks=("t",)))
    store.set_job_state(job.id, JobState.RUNNING)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("select state from jobs")).scalar() == "running"
    found = store.get_job(job.id)
    assert found.state is JobState.RUNNING and found.to_dict()["state"] == "running"
    with pytest.raises(ValueError):
        store.set_job_state(job.id, "paused")


def test_release_returns_an_owners_items(store):
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, items_for(3))
    store.claim_items(job.id, "me", 3)
    assert store.release_items("me") == 3
    assert store.item_states(job.id) == {"pending": 3}
    assert store.run_counts(job.id) == {"k0": 1, "k1": 1, "k2": 1}


def test_results_round_trip(store):
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, items_for(2))
    store.claim_items(job.id, "me", 2)
    store.complete_items("me", {"k0": [-0.25, False], "k1": "text"})
    assert store.results_for(["k0", "k1", "missing"]) == {"k0": [-0.25, False], "k1": "text"}
    listed = store.job_items(job.id, with_args=True)
    assert [(i["key"], i["args"], i["result"]) for i in listed] == [
        ("k0", {"i": 0}, [-0.25, False]), ("k1", {"i": 1}, "text")]
    assert "args" not in store.job_items(job.id)[0]


@pytest.mark.parametrize("url", ["not a url", "mysql://x/y", "sqlite:////no/such/dir/x.db"])
def test_bad_database_urls_raise_one_line_errors(url):
    with pytest.raises(DatabaseURLError) as e:
        Store(url)
    assert "\n" not in str(e.value)


def test_unknown_job(store):
    with pytest.raises(JobNotFoundError):
        store.get_job("nope")


@settings(max_examples=50, deadline=None)
@given(
    tasks=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4),
    limit=st.none() | st.integers(1, 10_000),
    num_fewshot=st.none() | st.integers(0, 25),
    gen=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3),
)
def test_job_spec_round_trips_through_the_store(tmp_path_factory, tasks, limit, num_fewshot, gen):
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('h') / 'h.db'}")
    spec = JobSpec(tasks=tuple(tasks), limit=limit, num_fewshot=num_fewshot, gen_kwargs=gen)
    assert store.get_job(store.create_job(spec).id).spec == spec
