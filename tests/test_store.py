"""The store: schema migration, item dedupe, claims, batched commits, stale requeue."""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.config import JobSpec
from conserve_bench.errors import DatabaseURLError, JobNotFoundError
from conserve_bench.store import MIGRATIONS, Store, WorkItem

EXPECTED_SCHEMA = {
    "schema_version": {"version"},
    "jobs": {"id", "state", "spec", "num_total", "results", "error", "created_at",
             "updated_at", "run_s", "run_key"},
    "items": {"key", "kind", "args", "state", "result", "owner", "claimed_at", "finished_at",
              "num_runs"},
    "job_items": {"job_id", "item_key", "seq"},
    "profiles": {"model", "dtype", "device", "vllm_version", "parallel_size", "model_json",
                 "num_samples", "fit_error", "created_at"},
}


def items_for(n, kind="loglikelihood", prefix="k"):
    return [WorkItem(f"{prefix}{i}", kind, {"i": i}) for i in range(n)]


def test_blank_database_migrates_to_expected_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'blank.db'}"
    Store(url)
    inspector = sa.inspect(sa.create_engine(url))
    schema = {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}
    assert schema == EXPECTED_SCHEMA
    with sa.create_engine(url).connect() as conn:
        assert conn.execute(sa.text("select version from schema_version")).scalar() == len(MIGRATIONS)
        assert conn.execute(sa.text("pragma journal_mode")).scalar() == "wal"


# A store at version 2, before `run_key` (m003): the DDL that day's m001 + m002 ran on SQLite.
V2_SCHEMA = [
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE jobs (id VARCHAR(32) NOT NULL, state VARCHAR(16) NOT NULL, spec TEXT NOT NULL, "
    "num_total INTEGER NOT NULL, results TEXT, error TEXT, created_at FLOAT NOT NULL, "
    "updated_at FLOAT NOT NULL, run_s FLOAT NOT NULL, PRIMARY KEY (id))",
    "CREATE INDEX ix_jobs_state ON jobs (state)",
    'CREATE TABLE items ("key" VARCHAR(64) NOT NULL, kind VARCHAR(32) NOT NULL, args TEXT NOT NULL, '
    "state VARCHAR(16) NOT NULL, result TEXT, owner VARCHAR(128), claimed_at FLOAT, "
    'finished_at FLOAT, num_runs INTEGER NOT NULL, PRIMARY KEY ("key"))',
    "CREATE INDEX ix_items_state ON items (state)",
    "CREATE TABLE job_items (job_id VARCHAR(32) NOT NULL, item_key VARCHAR(64) NOT NULL, "
    "seq INTEGER NOT NULL, PRIMARY KEY (job_id, item_key), FOREIGN KEY(job_id) REFERENCES jobs (id), "
    'FOREIGN KEY(item_key) REFERENCES items ("key"))',
    "CREATE INDEX ix_job_items_item ON job_items (item_key)",
    "CREATE TABLE profiles (model VARCHAR(256) NOT NULL, dtype VARCHAR(32) NOT NULL, "
    "device VARCHAR(256) NOT NULL, vllm_version VARCHAR(64) NOT NULL, parallel_size INTEGER NOT NULL, "
    "model_json TEXT NOT NULL, num_samples INTEGER NOT NULL, fit_error TEXT, created_at FLOAT NOT NULL, "
    "PRIMARY KEY (model, dtype, device, vllm_version, parallel_size))",
    "INSERT INTO schema_version VALUES (2)",
    """INSERT INTO jobs VALUES ('oldjob', 'done', '{"tasks": ["mmlu_anatomy"], "limit": 3}', 0, NULL, NULL, 1.0, 1.0, 0.5)""",
]


def test_a_version_2_store_migrates_and_keeps_its_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with sa.create_engine(url).begin() as conn:
        for statement in V2_SCHEMA:
            conn.execute(sa.text(statement))
    store = Store(url)
    old = store.get_job("oldjob")
    assert (old.state, old.spec.tasks, old.spec.limit, old.run_key) == ("done", ("mmlu_anatomy",), 3, None)
    inspector = sa.inspect(sa.create_engine(url))
    assert {c["name"] for c in inspector.get_columns("jobs")} == EXPECTED_SCHEMA["jobs"]
    assert any(i["unique"] and i["column_names"] == ["run_key"] for i in inspector.get_indexes("jobs"))
    keyed = store.create_job(JobSpec(tasks=("t",)), run_key="nightly")
    assert store.create_job(JobSpec(tasks=("t",)), run_key="nightly").id == keyed.id
    assert Store(url).job_by_run_key("nightly").id == keyed.id  # reopening migrates nothing twice


def test_a_run_key_names_one_job_and_many_jobs_have_none(store):
    first = store.create_job(JobSpec(tasks=("a",)), run_key="2024-06-01-abc")
    again = store.create_job(JobSpec(tasks=("other",)), run_key="2024-06-01-abc")
    assert again.id == first.id and again.spec.tasks == ("a",)  # the caller compares specs
    assert store.job_by_run_key("2024-06-01-abc").to_dict()["run_key"] == "2024-06-01-abc"
    assert store.job_by_run_key("nope") is None
    unnamed = [store.create_job(JobSpec(tasks=("a",))) for _ in range(2)]
    assert len({j.id for j in unnamed} | {first.id}) == 3


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


def test_claims_follow_job_order_and_kind(store):
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, items_for(4, "generate_until", "g") + items_for(2))
    assert [w.key for w in store.claim_items(job.id, "me", 3, kind="generate_until")] == ["g0", "g1", "g2"]
    assert [w.key for w in store.claim_items(job.id, "me", 3, kind="loglikelihood")] == ["k0", "k1"]
    assert store.claim_items(job.id, "other", 3, kind="loglikelihood") == []


def test_dead_owner_items_return_to_pending(store):
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, items_for(4))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    store.claim_items(job.id, f"{socket.gethostname()}:{dead}", 2)
    store.claim_items(job.id, f"{socket.gethostname()}:{__import__('os').getpid()}", 1)
    assert store.item_states(job.id) == {"running": 3, "pending": 1}
    assert store.requeue_stale() == 2  # only the dead process's claims
    assert store.item_states(job.id) == {"running": 1, "pending": 3}


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
