"""Opening a store safely: a crash inside a migration leaves the version before it, a store of
a newer conserve-bench and a file that is no database are refused in one line (and left as
they were), PostgreSQL connections carry timeouts and keepalives bounded by the lease, and no
error shows a URL's credentials (or, where it may reach an HTTP body, the URL at all)."""

from __future__ import annotations

import re
import sqlite3

import pytest
import sqlalchemy as sa

from conserve_bench import faults
from conserve_bench.config import LeaseConfig
from conserve_bench.errors import (DatabaseURLError, JobNotFoundError, NotAStoreError,
                                   StoreUnavailableError, StoreVersionError)
from conserve_bench.faults import InjectedFault
from conserve_bench.store import MIGRATIONS, Store
from conserve_bench.store.db import create_engine, pg_connect_args, safe_url
from conserve_bench.store.migrations import migrate

from .conftest import cli
from .test_store import schema_of

NEWER = len(MIGRATIONS) + 3


def version_of(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("select version from schema_version")).scalar()


@pytest.fixture
def no_faults():
    yield
    faults.arm("")


# -- migrations: atomic, and never downwards ------------------------------------------------


@pytest.mark.parametrize("old_version", [3, 4])  # the next one ALTERs jobs (m004), items (m005)
def test_a_crash_after_a_migrations_ddl_leaves_the_store_at_its_previous_version(
        new_db_url, old_version, no_faults):
    """Before, SQLite committed the ALTER on its own: the store, still at the old version,
    failed every open after with "duplicate column name"."""
    url = new_db_url()
    old = create_engine(url)
    migrate(old, MIGRATIONS[:old_version])
    before = schema_of(old)
    faults.arm("migration.after_ddl:1")
    with pytest.raises(InjectedFault):
        Store(url)
    assert version_of(old) == old_version and schema_of(old) == before
    reopened = Store(url)  # the fault spent: migrates cleanly
    blank = Store(new_db_url())
    assert version_of(old) == len(MIGRATIONS)
    assert schema_of(reopened.engine) == schema_of(blank.engine)
    for engine in (old, reopened.engine, blank.engine):
        engine.dispose()


def test_a_crash_in_the_first_migration_leaves_a_blank_database(new_db_url, no_faults):
    url = new_db_url()
    faults.arm("migration.after_ddl:1")
    with pytest.raises(InjectedFault):
        Store(url)
    engine = create_engine(url)
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()
    assert Store(url).num_jobs() == 0


def test_a_store_of_a_newer_version_is_refused_in_one_line_and_left_untouched(new_db_url):
    url = new_db_url()
    Store(url).engine.dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("update schema_version set version = :v"), {"v": NEWER})
    before = schema_of(engine)
    with pytest.raises(StoreVersionError) as e:
        Store(url)
    message = str(e.value)
    assert "\n" not in message
    assert re.search(rf"\b{NEWER}\b", message) and re.search(rf"\b{len(MIGRATIONS)}\b", message)
    assert version_of(engine) == NEWER and schema_of(engine) == before
    engine.dispose()


def test_the_cli_refuses_a_newer_store_with_one_line(run_cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    Store(url)
    with sqlite3.connect(tmp_path / "newer.db") as conn:
        conn.execute("update schema_version set version = ?", (NEWER,))
    code, out, err = run_cli("jobs", "--db", url)
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and str(NEWER) in err and "newer conserve-bench" in err


# -- a file that is no database ---------------------------------------------------------------


@pytest.mark.parametrize("content", [bytes(range(256)) * 16, b"job_id,state\nabc,done\n"],
                         ids=["random-bytes", "text"])
def test_a_file_that_is_no_database_is_one_line_from_the_cli_and_never_written(tmp_path, content):
    path = tmp_path / "bad.db"
    path.write_bytes(content)
    done = cli("jobs", "--db", f"sqlite:///{path}", timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "is not a conserve-bench store" in lines[0] and "not a database" in lines[0]
    assert str(path) in lines[0] and "Traceback" not in done.stderr
    assert path.read_bytes() == content


def test_a_file_that_is_no_database_raises_not_a_store(tmp_path):
    path = tmp_path / "bad.db"
    path.write_text("not a database at all\n" * 100)
    with pytest.raises(NotAStoreError, match="not a conserve-bench store"):
        Store(f"sqlite:///{path}")


# -- PostgreSQL: timeouts and keepalives bounded by the lease --------------------------------


def test_pg_connections_get_timeouts_and_keepalives_scaled_to_the_lease():
    url = sa.make_url("postgresql+psycopg://u:p@db.example/store")
    assert pg_connect_args(url, LeaseConfig()) == {
        "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
        "keepalives_count": 3, "options": "-c statement_timeout=15000"}
    args = pg_connect_args(url, LeaseConfig(lease_s=120, heartbeat_s=20))
    assert args["options"] == "-c statement_timeout=60000"
    # NOTE: a statement, or a dead server noticed by keepalives, ends inside one lease
    assert args["keepalives_idle"] + args["keepalives_interval"] * args["keepalives_count"] < 120


def test_what_a_pg_url_sets_itself_wins():
    url = sa.make_url("postgresql+psycopg://u:p@h/db?connect_timeout=9&keepalives=0"
                      "&options=-c%20search_path%3Dx")
    args = pg_connect_args(url, LeaseConfig())
    assert "connect_timeout" not in args and "keepalives" not in args
    assert args["options"] == "-c search_path=x -c statement_timeout=15000"
    own = sa.make_url("postgresql+psycopg://h/db?options=-c%20statement_timeout%3D0")
    assert "options" not in pg_connect_args(own, LeaseConfig())


def test_a_pg_store_connects_with_them(pg_store):
    with pg_store.engine.connect() as conn:
        assert conn.execute(sa.text("show statement_timeout")).scalar() == "15s"
        params = conn.connection.dbapi_connection.info.get_parameters()
    assert {k: params.get(k) for k in ("connect_timeout", "keepalives", "keepalives_idle",
                                       "keepalives_interval", "keepalives_count")} == {
        "connect_timeout": "5", "keepalives": "1", "keepalives_idle": "10",
        "keepalives_interval": "3", "keepalives_count": "3"}


# -- no URL where it does not belong ---------------------------------------------------------


def test_urls_are_shown_without_credentials():
    url = "postgresql+psycopg://bench:s3cret@db.example:5432/store?password=s3cret&sslkey=/k"
    shown = safe_url(url)
    assert "s3cret" not in shown and "/k" not in shown and "db.example:5432/store" in shown
    with pytest.raises(DatabaseURLError) as e:
        Store("postgresql+psycopg://bench:s3cret@127.0.0.1:1/store?password=s3cret")
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DatabaseURLError) as e:
        Store("mysql://bench:s3cret@db.example/store")
    assert "s3cret" not in str(e.value)


def test_errors_that_may_reach_http_carry_no_url_or_path(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}", LeaseConfig(lease_s=0.2, heartbeat_s=0.1))
    with pytest.raises(JobNotFoundError) as e:
        store.get_job("nope")
    assert str(tmp_path) not in str(e.value) and "sqlite" not in str(e.value)

    def locked(retry: bool):
        raise sa.exc.OperationalError("update items", {}, sqlite3.OperationalError("database is locked"))

    with pytest.raises(StoreUnavailableError) as e:
        store._retrying(locked)
    assert str(tmp_path) not in str(e.value) and "sqlite" not in str(e.value)
    assert "0.2 s" in str(e.value)
