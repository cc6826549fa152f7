"""Opening a database: URL checks, SQLite's pragmas, and the one dialect-specific statement.

SQLite (WAL, the embedded default) and PostgreSQL are supported; any other URL is refused
with a one-line `DatabaseURLError` before anything is written.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from conserve_bench.errors import DatabaseURLError

DIALECTS = ("sqlite", "postgresql")


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
