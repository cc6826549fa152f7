"""Opening a database, and everything that differs between SQLite and PostgreSQL.

SQLite (WAL, the embedded default) and PostgreSQL are supported; any other URL is refused
with a one-line `DatabaseURLError` before anything is written. Here live the dialects'
differences the store needs: transactions (on SQLite, SQLAlchemy emits BEGIN itself, so DDL
is transactional and a write takes the writer lock at BEGIN IMMEDIATE), PostgreSQL's
timeouts and keepalives (bounded by the lease), INSERT ... ON CONFLICT, the database's
clock, the lock that serialises migrations, fresh planner statistics, and which errors are
a passing outage worth retrying or a file that is no database. A URL is shown only through
`safe_url`, never with its password or query.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from conserve_bench.config import LeaseConfig
from conserve_bench.errors import DatabaseURLError

DIALECTS = ("sqlite", "postgresql")
MIGRATION_LOCK = 0x436F6E7365727665  # any constant: one advisory lock for all migrations
WRITE_OPTION = "conserve_write"  # execution option: this transaction writes (BEGIN IMMEDIATE)
MIN_STATEMENT_TIMEOUT_S = 1.0  # below this, a loaded server's ordinary statements time out
KEEPALIVE_PROBES = 3
SQLITE_ANALYSIS_ROWS = 1000  # `refresh_statistics`: rows SQLite samples per index
# Messages of SQLite's SQLITE_NOTADB and SQLITE_CORRUPT: the file is no (intact) database.
SQLITE_NOT_A_DATABASE = ("file is not a database", "database disk image is malformed")


def create_engine(url: str, leases: LeaseConfig = LeaseConfig()) -> sa.Engine:
    """The engine of a store's URL; `leases` bounds PostgreSQL's timeouts (`pg_connect_args`)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True,
                                connect_args=pg_connect_args(parsed, leases))
    if parsed.database and parsed.database != ":memory:":
        directory = os.path.dirname(os.path.abspath(parsed.database))
        if not os.path.isdir(directory):
            raise DatabaseURLError(f"database directory {directory!r} does not exist")
    engine = sa.create_engine(parsed, connect_args={"timeout": 30})
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def parse_url(url: str) -> sa.URL:
    """The URL, if it names a supported database; else a one-line DatabaseURLError."""
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        shown = f" {url!r}" if "@" not in url else ""  # NOTE: never echo credentials
        raise DatabaseURLError(
            f"malformed database URL{shown} (expected e.g. sqlite:///conserve.db)") from None
    if parsed.get_backend_name() not in DIALECTS:
        raise DatabaseURLError(f"unsupported database {parsed.get_backend_name()!r} "
                               f"in {safe_url(parsed)}")
    return parsed


def safe_url(url: str | sa.URL) -> str:
    """The URL as logs and a user's terminal may show it: no password, no query (which may
    hold one, or a key file's path)."""
    return sa.make_url(url).set(query={}).render_as_string(hide_password=True)


def pg_connect_args(url: sa.URL, leases: LeaseConfig) -> dict[str, object]:
    """libpq settings every PostgreSQL connection of a store gets, unless its URL's query
    sets them already (the URL wins):

    - `statement_timeout` half a lease (at least MIN_STATEMENT_TIMEOUT_S): a statement must
      not outlive a lease, and the half left lets `StoreBase._retrying` try it again;
    - `connect_timeout` a sixth of a lease (libpq's least is 2 s): several attempts fit in
      the lease that a passing outage is retried for;
    - TCP keepalives, idle a third of a lease then KEEPALIVE_PROBES probes a tenth of a
      lease apart: a server that vanished mid-statement (it can send no timeout) is noticed
      within two thirds of a lease.
    """
    lease_s = leases.lease_s
    defaults: dict[str, object] = {
        "connect_timeout": max(2, math.ceil(lease_s / 6)),
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(lease_s / 3)),
        "keepalives_interval": max(1, math.ceil(lease_s / 10)),
        "keepalives_count": KEEPALIVE_PROBES,
    }
    args = {key: value for key, value in defaults.items() if key not in url.query}
    options = url.query.get("options", "")
    options = " ".join(options) if isinstance(options, tuple) else options
    if "statement_timeout" not in options:
        timeout_ms = round(1000 * max(lease_s / 2, MIN_STATEMENT_TIMEOUT_S))
        args["options"] = f"{options} -c statement_timeout={timeout_ms}".strip()
    return args


def _sqlite_connect(dbapi_conn, _record) -> None:
    # NOTE: WAL lets `status` read while a job commits; synchronous=NORMAL is durable
    # across process kills (only a power loss can drop the last commit).
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # NOTE: the sqlite3 driver begins a transaction before INSERT/UPDATE/DELETE only, never
    # before DDL: an ALTER would commit on its own, and a crash before the version bump
    # leave a store no command could open again. `_sqlite_begin` emits every BEGIN instead.
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: sa.Connection) -> None:
    # NOTE: a write takes the writer lock at BEGIN (waiting up to the busy timeout): begun
    # deferred, a transaction that read first could not upgrade once another had committed.
    # Reads stay deferred: in WAL they never wait for a writer.
    immediate = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextlib.contextmanager
def write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """`engine.begin()` for a transaction that writes (SQLite: BEGIN IMMEDIATE)."""
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            yield conn


def is_not_a_database(error: sa.exc.DBAPIError) -> bool:
    """SQLite found no intact database in the file (random bytes, a text file, damage)."""
    return "sqlite" in type(error.orig).__module__ and any(
        message in str(error.orig) for message in SQLITE_NOT_A_DATABASE)


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

    PostgreSQL: a transaction-level advisory lock, and no statement timeout for this
    transaction (a migration of a large store, or the wait for another replica's, may take
    longer than a lease). SQLite: the transaction's BEGIN IMMEDIATE admits one writer.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
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


def refresh_statistics(conn: sa.Connection, tables: list[str]) -> None:
    """Let the planner see a table that just grew by thousands of rows.

    NOTE: PostgreSQL plans a claim from its statistics; right after a job's items arrive,
    before autovacuum has analysed them, it would join every item of the job to sort them,
    instead of walking the claim index. SQLite without statistics looks an item up by its
    primary key and reads its row (prompt and result) where `ix_items_progress` holds all a
    job's progress needs; its statistics are sampled (`analysis_limit`), so this costs about
    the same in a store of any size.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("ANALYZE " + ", ".join(tables)))
    else:
        conn.execute(sa.text(f"PRAGMA analysis_limit = {SQLITE_ANALYSIS_ROWS}"))
        for table in tables:
            conn.execute(sa.text(f"ANALYZE {table}"))
