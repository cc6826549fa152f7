"""The store's connection: one SQLAlchemy engine per database URL, migrated when opened, and
its transactions retried through a passing outage. `repository.Store` is built from the parts
(`partials`, `replicas`, `profile_rows`) that share it. Its errors are one line each and never
carry the URL (they may reach an HTTP body): the URL, without its password, goes to the log
and to the one-line errors of opening a store, which only its user sees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from conserve_bench.config import LeaseConfig
from conserve_bench.errors import DatabaseURLError, NotAStoreError, StoreUnavailableError, first_line
from conserve_bench.store.db import (create_engine, is_not_a_database, is_transient, now_s,
                                     safe_url, write_transaction)
from conserve_bench.store.migrations import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_MAX_VARS = 900  # stay under SQLite's bound-parameter limit in IN (...) lists
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 2.0  # backoff while the database is unreachable


class StoreBase:
    """One database URL: its engine, its clock, its retried transactions. Safe to share across
    threads of one process.

    `leases` sets how long a claim lasts, and how many failed attempts fail an item.
    """

    def __init__(self, url: str, leases: LeaseConfig = LeaseConfig()):
        self.url, self.leases = url, leases
        self.engine = create_engine(url, leases)
        self.dialect = self.engine.dialect.name
        try:
            migrate(self.engine)
        except DBAPIError as e:
            raise self._open_error(e) from None

    def _open_error(self, error: DBAPIError) -> DatabaseURLError:
        """Why the store could not be opened, as one line naming it (only its user sees it).

        NOTE: a file that is no database is never written to: SQLite refuses it at the
        first statement, before the migrations could touch it.
        """
        if is_not_a_database(error):
            return NotAStoreError(f"{self._safe_url} is not a conserve-bench store: "
                                  f"{first_line(error.orig)}")
        return DatabaseURLError(f"cannot open database {self._safe_url}: {first_line(error.orig)}")

    @property
    def _safe_url(self) -> str:
        return safe_url(self.url)

    @property
    def _now(self):
        return now_s(self.dialect)

    # -- transactions, retried through a passing outage ---------------------------------------

    def _retrying(self, fn: Callable[[bool], T]) -> T:
        """`fn(retry)` (one transaction), run again while the database is unreachable, for up
        to one lease; `retry` tells it that an earlier run may have committed unseen.

        NOTE: every caller is safe to run twice: inserts ignore existing rows, updates are
        guarded by the state they change, and a claim gives back what an unseen commit took.
        """
        deadline = time.monotonic() + self.leases.lease_s
        delay, retry = RETRY_FIRST_S, False
        while True:
            try:
                return fn(retry)
            except DBAPIError as e:
                if is_not_a_database(e):
                    raise NotAStoreError("the store's database file is damaged: "
                                         f"{first_line(e.orig)}") from None
                if not is_transient(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(e) from None
                log.warning("database unreachable, retrying in %.1f s: %s", delay, first_line(e.orig))
                time.sleep(delay)
                delay, retry = min(2 * delay, RETRY_MAX_S), True

    def _unavailable(self, error: DBAPIError) -> StoreUnavailableError:
        # NOTE: the URL and the driver's message (hosts, paths) go to the log only: this
        # error may reach an HTTP body.
        log.error("database %s unreachable for %g s: %s", self._safe_url, self.leases.lease_s,
                  first_line(error.orig))
        return StoreUnavailableError(f"the job store's database was unreachable for "
                                     f"{self.leases.lease_s:g} s ({type(error.orig).__name__})")

    def _begin(self):
        """A write transaction (`db.write_transaction`: on SQLite it holds the writer lock
        from BEGIN on, so a read-then-write in it is atomic)."""
        return write_transaction(self.engine)

    def _write(self, fn: Callable[[sa.Connection], T]) -> T:
        def transaction(retry: bool) -> T:
            with self._begin() as conn:
                return fn(conn)

        return self._retrying(transaction)

    def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        def read(retry: bool) -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        return self._retrying(read)


def chunks(seq: Sequence, size: int = SQLITE_MAX_VARS) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def attempt_param(attempts: Mapping[str, int] | None, key: str) -> dict[str, int]:
    return {} if attempts is None else {"attempt": attempts[key]}
