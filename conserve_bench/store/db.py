"""Opening a database, and everything that differs between SQLite and PostgreSQL.

SQLite (WAL, the embedded default) and PostgreSQL are supported; any other URL is refused
with a one-line `DatabaseURLError` before anything is written. Here live the dialects'
differences the store needs: INSERT ... ON CONFLICT, the database's clock, the lock that
serialises migrations, fresh planner statistics, and which errors are a passing outage
worth retrying.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from conserve_bench.errors import DatabaseURLError

DIALECTS = ("sqlite", "postgresql")
MIGRATION_LOCK = 0x436F6E7365727665  # any constant: one advisory lock for all migrations


def create_engine(url: str) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise DatabaseURLError(
            f"malformed database URL {url!r} (expected e.g. sqlite:///conserve.db)"
        ) from None
    if parsed.get_backend_name() not in DIALECTS:
        raise DatabaseURLError(f"unsupported database {parsed.get_backend_name()!r} in {url!r}")
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        directory = os.path.dirname(os.path.abspath(parsed.database))
        if not os.path.isdir(directory):
            raise DatabaseURLError(f"database directory {directory!r} does not exist")
    engine = sa.create_engine(parsed, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        # NOTE: WAL lets `status` read while a job commits; synchronous=NORMAL is durable
        # across process kills (only a power loss can drop the last commit).
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def insert_ignore(table: sa.Table, conn: sa.Connection):
    """INSERT that skips rows whose primary key exists (items shared between jobs)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise DatabaseURLError(f"unsupported database dialect {dialect!r}")
    return insert(table).on_conflict_do_nothing()


def now_s(dialect: str) -> sa.ColumnElement:
    """The database's clock in Unix seconds, fixed for the duration of one statement.

    NOTE: leases are measured on this clock only, never a client's: the clocks of the
    machines of a fleet may disagree, the database's is the one they share.
    """
    if dialect == "postgresql":
        return sa.cast(sa.extract("epoch", sa.func.statement_timestamp()), sa.Float)
    return (sa.func.julianday("now") - 2440587.5) * 86400.0


def lock_for_migration(conn: sa.Connection) -> None:
    """Serialise migrations: replicas starting together must not create tables twice.

    PostgreSQL: a transaction-level advisory lock. SQLite: one writer at a time already.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))


def is_transient(error: sa.exc.DBAPIError) -> bool:
    """An outage that retrying fixes: a lost or refused connection, a server restarting, a
    deadlock or serialisation failure (PostgreSQL rolled the transaction back), or SQLite's
    writer lock held beyond its timeout. Anything else is a bug or a bad schema."""
    if error.connection_invalidated:
        return True
    if not isinstance(error, sa.exc.OperationalError):
        return False
    return "sqlite" not in type(error.orig).__module__ or "database is locked" in str(error.orig)


def refresh_statistics(conn: sa.Connection, tables: list[sa.Table]) -> None:
    """Let the planner see a table that just grew by thousands of rows.

    NOTE: PostgreSQL plans a claim from its statistics; right after a job's items arrive,
    before autovacuum has analysed them, it would join every item of the job to sort them,
    instead of walking the claim index. SQLite plans from its indexes alone.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("ANALYZE " + ", ".join(t.name for t in tables)))
