"""The store's connection: one SQLAlchemy engine per database URL, migrated when opened, and
its transactions retried through a passing outage. `repository.Store` is built from the parts
(`partials`, `workers`, `profile_rows`) that share it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError

from conserve_bench.config import LeaseConfig
from conserve_bench.errors import DatabaseURLError, StoreUnavailableError, first_line
from conserve_bench.store.db import create_engine, is_transient, now_s
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
        self.engine = create_engine(url)
        self.dialect = self.engine.dialect.name
        try:
            migrate(self.engine)
        except OperationalError as e:
            raise DatabaseURLError(f"cannot open database {self._safe_url}: {first_line(e.orig)}") from None

    @property
    def _safe_url(self) -> str:
        return sa.make_url(self.url).render_as_string(hide_password=True)

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
                if not is_transient(e):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailableError(
                        f"database {self._safe_url} unreachable for {self.leases.lease_s:g} s: "
                        f"{first_line(e.orig)}") from None
                log.warning("database unreachable, retrying in %.1f s: %s", delay, first_line(e.orig))
                time.sleep(delay)
                delay, retry = min(2 * delay, RETRY_MAX_S), True

    def _write(self, fn: Callable[[sa.Connection], T]) -> T:
        def transaction(retry: bool) -> T:
            with self.engine.begin() as conn:
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
