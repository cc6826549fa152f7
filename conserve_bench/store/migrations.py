"""Schema migrations: ordered, named, each run once, each frozen as the day it was written.

Version N means the first N migrations have run (`schema_version`). A migration declares the
tables it creates or alters itself, in its own `MetaData`; it must never use the live tables
of `schema.py`, which follow the current schema: an old store and a blank one must end up
identical (tests/test_store.py). Add a migration at the end; never edit one that shipped.
Each migration commits with its version bump in one transaction (DDL included, on SQLite
too), so a crash leaves the store at the version before it; a store of a newer
conserve-bench is refused, never migrated down or written to.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from conserve_bench.errors import StoreVersionError
from conserve_bench.faults import fault_point
from conserve_bench.store.db import lock_for_migration, refresh_statistics, write_transaction
from conserve_bench.store.schema import schema_version


def m001_initial(conn: sa.Connection) -> None:
    """Jobs, work items and the job -> item links (f2e394e, the walking skeleton)."""
    meta = sa.MetaData()
    jobs = sa.Table(
        "jobs", meta,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("num_total", sa.Integer, nullable=False),
        sa.Column("results", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("run_s", sa.Float, nullable=False),
    )
    items = sa.Table(
        "items", meta,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("result", sa.Text),
        sa.Column("owner", sa.String(128)),
        sa.Column("claimed_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("num_runs", sa.Integer, nullable=False),
    )
    job_items = sa.Table(
        "job_items", meta,
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("item_key", sa.String(64), sa.ForeignKey("items.key"), primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Index("ix_job_items_item", "item_key"),
    )
    for table in (jobs, items, job_items):
        table.create(conn, checkfirst=True)


def m002_profiles(conn: sa.Connection) -> None:
    """Latency profiles, keyed by everything a step time depends on (0c4d538)."""
    sa.Table(
        "profiles", sa.MetaData(),
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("dtype", sa.String(32), primary_key=True),
        sa.Column("device", sa.String(256), primary_key=True),
        sa.Column("vllm_version", sa.String(64), primary_key=True),
        sa.Column("parallel_size", sa.Integer, primary_key=True),
        sa.Column("model_json", sa.Text, nullable=False),
        sa.Column("num_samples", sa.Integer, nullable=False),
        sa.Column("fit_error", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
    ).create(conn, checkfirst=True)


def m003_profile_refits(conn: sa.Connection) -> None:
    """The latest live refit of each latency profile, under the profile's key (#14)."""
    sa.Table(
        "profile_refits", sa.MetaData(),
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("dtype", sa.String(32), primary_key=True),
        sa.Column("device", sa.String(256), primary_key=True),
        sa.Column("vllm_version", sa.String(64), primary_key=True),
        sa.Column("parallel_size", sa.Integer, primary_key=True),
        sa.Column("state_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    ).create(conn, checkfirst=True)


def m004_run_key(conn: sa.Connection) -> None:
    """A caller's name for a job (`ci --run-key`), unique, so that a rerun finds its job (#18)."""
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN run_key VARCHAR(200)"))
    conn.execute(sa.text("CREATE UNIQUE INDEX ux_jobs_run_key ON jobs (run_key)"))


def m005_leases(conn: sa.Connection) -> None:
    """Fleet mode: items leased on the database's clock, attempts and failures, claim order;
    one heartbeat row per worker (issue #19)."""
    for column in (
        sa.Column("seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("lease_until", sa.Float),
        sa.Column("num_failures", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("error", sa.Text),
    ):
        _add_column(conn, "items", column)
    # NOTE: an item's first position in any job is its claim order (new items: store-wide).
    conn.execute(sa.text("UPDATE items SET seq = COALESCE((SELECT MIN(job_items.seq) FROM "
                         "job_items WHERE job_items.item_key = items.key), 0)"))
    conn.execute(sa.text("DROP INDEX ix_items_state"))
    meta = sa.MetaData()
    items = sa.Table("items", meta, sa.Column("state"), sa.Column("seq"), sa.Column("lease_until"))
    sa.Index("ix_items_claim", items.c.state, items.c.seq).create(conn)
    sa.Index("ix_items_lease", items.c.state, items.c.lease_until).create(conn)
    sa.Table(
        "workers", meta,
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(256), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("lease_until", sa.Float, nullable=False),
        sa.Column("job_id", sa.String(32)),
        sa.Index("ix_workers_lease", "state", "lease_until"),
    ).create(conn, checkfirst=True)


def _add_column(conn: sa.Connection, table: str, column: sa.Column) -> None:
    """ALTER TABLE ... ADD COLUMN, typed as this dialect types the column in a CREATE TABLE."""
    ddl = f"ALTER TABLE {table} ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"
    if column.server_default is not None:
        ddl += f" DEFAULT {column.server_default.arg.text}"
    if not column.nullable:
        ddl += " NOT NULL"
    conn.execute(sa.text(ddl))


def m006_item_partials(conn: sa.Connection) -> None:
    """The checkpointed tokens of unfinished generations and each item's resumes (#17)."""
    meta = sa.MetaData()
    sa.Table("items", meta, sa.Column("key", sa.String(64), primary_key=True))  # the FK's target
    sa.Table(
        "item_partials", meta,
        sa.Column("item_key", sa.String(64), sa.ForeignKey("items.key"), primary_key=True),
        sa.Column("token_ids", sa.Text, nullable=False),
        sa.Column("num_tokens", sa.Integer, nullable=False),
        sa.Column("num_resumes", sa.Integer, nullable=False),
        sa.Column("num_reused_tokens", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    ).create(conn, checkfirst=True)


def m007_batches(conn: sa.Connection) -> None:
    """The OpenAI Batch API's files and batches (#34)."""
    meta = sa.MetaData()
    sa.Table("jobs", meta, sa.Column("id", sa.String(32), primary_key=True))  # the FK's target
    sa.Table(
        "files", meta,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(256), nullable=False),
        sa.Column("num_bytes", sa.BigInteger, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    ).create(conn, checkfirst=True)
    sa.Table(
        "batches", meta,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("num_lines", sa.Integer, nullable=False),
        sa.Column("line_errors", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text),
        sa.Column("errors", sa.Text),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        *(sa.Column(f"{stamp}_at", sa.Float) for stamp in (
            "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")),
    ).create(conn, checkfirst=True)


def m008_batch_usage(conn: sa.Connection) -> None:
    """A finished batch's token totals (OpenAI's `usage`), written when it is finalized."""
    _add_column(conn, "batches", sa.Column("usage", sa.Text))


def m009_items_progress(conn: sa.Connection) -> None:
    """A job's progress counted from an index, never the item rows (#36)."""
    items = sa.Table("items", sa.MetaData(), sa.Column("key"), sa.Column("state"), sa.Column("owner"))
    sa.Index("ix_items_progress", items.c.key, items.c.state, items.c.owner).create(conn)
    refresh_statistics(conn, ["items", "job_items"])


def m010_settled_counts(conn: sa.Connection) -> None:
    """A done job's and a finalized batch's counts, kept with them: a list of jobs or
    batches counts only the live ones' items (#36)."""
    _add_column(conn, "jobs", sa.Column("progress", sa.Text))
    _add_column(conn, "batches", sa.Column("request_counts", sa.Text))


MIGRATIONS: list[Callable[[sa.Connection], None]] = [m001_initial, m002_profiles,
                                                      m003_profile_refits, m004_run_key,
                                                      m005_leases, m006_item_partials,
                                                      m007_batches, m008_batch_usage,
                                                      m009_items_progress, m010_settled_counts]


def migrate(engine: sa.Engine, migrations=MIGRATIONS) -> int:
    """Run the migrations a database has not run yet, each in its own transaction with its
    version bump; the resulting version. A store of a newer conserve-bench (a version past
    MIGRATIONS) is a StoreVersionError.

    `migrations` is for tests that build an old store from the first few.
    """
    while True:
        with write_transaction(engine) as conn:
            lock_for_migration(conn)
            version = _schema_version(conn)
            if version >= len(migrations):
                return version
            migrations[version](conn)
            # NOTE: a crash here (the fault suite's point) must roll the DDL back with the
            # bump: a store whose ALTER committed alone could never be opened again.
            fault_point("migration.after_ddl")
            conn.execute(schema_version.update().values(version=version + 1))


def _schema_version(conn: sa.Connection) -> int:
    """The store's version (0 for a blank database, which gets its version row here)."""
    schema_version.create(conn, checkfirst=True)
    version = conn.execute(sa.select(schema_version.c.version)).scalar()
    if version is None:
        conn.execute(schema_version.insert().values(version=0))
        return 0
    if version > len(MIGRATIONS):
        raise StoreVersionError(
            f"the store has schema version {version}, written by a newer conserve-bench; "
            f"this one knows versions up to {len(MIGRATIONS)}: upgrade conserve-bench")
    return version
