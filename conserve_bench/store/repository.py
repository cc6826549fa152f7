"""The durable job store: jobs, work items and their results (SQLAlchemy 2, SQLite default).

A work item is one lm-eval request, keyed by a content hash (request kind, arguments, model,
generation settings), so items are shared across jobs and a rebuilt job reuses every finished
one. This module owns all SQL (tables in `schema`, their history in `migrations`, the leased
work statements in `leases`); callers use the small repository API below and see plain
dataclasses. It never talks to the engine and never holds a transaction open across engine
work.

Life of an item (`states.ItemState`): pending -> running (leased by one worker until
`lease_until` on the database's clock, renewed by its heartbeat) -> done, committed only by
the worker and attempt that hold it; or back to pending (given back, or its attempt failed),
or taken by another worker's claim once the lease expired; failed after `max_attempts` failed
attempts. Several processes on several machines may share one PostgreSQL store this way.
A passing outage (a restart of the database) is retried for up to one lease.
A running `generate_until` item's tokens so far are checkpointed (`save_partials`, by the
worker and attempt that hold it) and handed to its next run (`resume_partials`), so an
interrupted generation continues instead of starting over.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError

from conserve_bench.config import JobSpec, LeaseConfig
from conserve_bench.errors import DatabaseURLError, JobNotFoundError, StoreUnavailableError
from conserve_bench.store import leases
from conserve_bench.store.db import (create_engine, insert_ignore, is_transient, now_s,
                                     refresh_statistics)
from conserve_bench.store.migrations import migrate
from conserve_bench.store.schema import (PROFILE_KEY_COLUMNS, item_partials, items,
                                         job_items, jobs, profile_refits, profiles,
                                         workers)
from conserve_bench.store.states import ItemState, JobState, WorkerState

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_MAX_VARS = 900  # stay under SQLite's bound-parameter limit in IN (...) lists
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 2.0  # backoff while the database is unreachable
MAX_ITEM_ERRORS = 5  # failed items `item_errors` lists
ANALYZE_AFTER_ITEMS = 1000  # items added at once that refresh the planner's statistics


# -- plain data handed to callers -------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """One request. `attempt`: which claim of it this is (set by `claim_items`; it fences
    the completion)."""

    key: str
    kind: str
    args: dict[str, Any]
    attempt: int = 0


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    spec: JobSpec
    num_total: int
    num_done: int
    created_at: float
    updated_at: float
    run_s: float
    error: str | None = None
    run_key: str | None = None
    num_failed: int = 0
    num_partial_items: int = 0  # unfinished items with checkpointed tokens
    num_partial_tokens: int = 0  # their tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "done": self.num_done,
            "total": self.num_total,
            "failed": self.num_failed,
            "partial_items": self.num_partial_items,
            "partial_tokens": self.num_partial_tokens,
            "tasks": list(self.spec.tasks),
            "model": self.spec.model,
            "limit": self.spec.limit,
            "num_fewshot": self.spec.num_fewshot,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "run_s": round(self.run_s, 3),
            "error": self.error,
            "run_key": self.run_key,
        }


def _chunks(seq: Sequence, size: int = SQLITE_MAX_VARS) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


class Store:
    """Repository over one database URL. Safe to share across threads of one process.

    `leases` sets how long a claim lasts, and how many failed attempts fail an item.
    """

    def __init__(self, url: str, leases: LeaseConfig = LeaseConfig()):
        self.url, self.leases = url, leases
        self.engine = create_engine(url)
        self.dialect = self.engine.dialect.name
        try:
            migrate(self.engine)
        except OperationalError as e:
            raise DatabaseURLError(f"cannot open database {self._safe_url}: {_one_line(e.orig)}") from None

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
                        f"{_one_line(e.orig)}") from None
                log.warning("database unreachable, retrying in %.1f s: %s", delay, _one_line(e.orig))
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

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, spec: JobSpec, run_key: str | None = None,
                   work: Sequence[WorkItem] = ()) -> Job:
        """Record a queued job, with `work` attached in the same transaction. With a `run_key`
        that a job holds already, that job is answered instead (whatever its spec: the caller
        checks), so two racing creators end with one job.

        NOTE: a job whose items are known (a requests job) must be created with them: a fleet
        replica runs any queued job, and one seen before its items would end done with none.
        """
        now = time.time()
        job_id = uuid.uuid4().hex[:12]
        row = dict(id=job_id, state=JobState.QUEUED, spec=json.dumps(spec.to_dict()),
                   num_total=0, created_at=now, updated_at=now, run_s=0.0, run_key=run_key)

        def create(conn: sa.Connection) -> None:
            # NOTE: the insert is skipped when retried after a commit whose answer was lost
            # (same id), or when `run_key` is taken already: then the key's holder is the job.
            if conn.execute(insert_ignore(jobs, conn).values(**row)).rowcount and work:
                self._attach_items(conn, job_id, work)

        self._write(create)
        if run_key is not None:
            return self.job_by_run_key(run_key)
        return self.get_job(job_id)

    def job_by_run_key(self, run_key: str) -> Job | None:
        found = self._select_jobs(jobs.c.run_key == run_key)
        return found[0] if found else None

    def get_job(self, job_id: str) -> Job:
        jobs_found = self._select_jobs(jobs.c.id == job_id)
        if not jobs_found:
            raise JobNotFoundError(f"no job {job_id!r} in {self._safe_url}")
        return jobs_found[0]

    def get_job_state(self, job_id: str) -> JobState:
        """Just the state (cheap: no item counts), e.g. to notice a cancel between commits."""
        state = self._read(lambda conn: conn.execute(
            sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar())
        if state is None:
            raise JobNotFoundError(f"no job {job_id!r} in {self._safe_url}")
        return JobState(state)

    def list_jobs(self, limit: int = 100) -> list[Job]:
        return self._select_jobs(sa.true(), limit=limit)

    def _select_jobs(self, where, limit: int | None = None) -> list[Job]:
        def count(state: ItemState):
            return (sa.select(sa.func.count())
                    .select_from(job_items.join(items, items.c.key == job_items.c.item_key))
                    .where(job_items.c.job_id == jobs.c.id, items.c.state == state)
                    .scalar_subquery())

        partial = (job_items.join(items, items.c.key == job_items.c.item_key)
                   .join(item_partials, item_partials.c.item_key == items.c.key))
        partial_where = (job_items.c.job_id == jobs.c.id, items.c.state != ItemState.DONE,
                         item_partials.c.num_tokens > 0)
        num_partial_items = sa.select(sa.func.count()).select_from(partial).where(*partial_where)
        num_partial_tokens = (sa.select(sa.func.coalesce(sa.func.sum(item_partials.c.num_tokens), 0))
                              .select_from(partial).where(*partial_where))
        query = sa.select(jobs, count(ItemState.DONE).label("num_done"),
                          count(ItemState.FAILED).label("num_failed"),
                          num_partial_items.scalar_subquery().label("num_partial_items"),
                          num_partial_tokens.scalar_subquery().label("num_partial_tokens"),
                          ).where(where)
        query = query.order_by(jobs.c.created_at.desc()).limit(limit)
        rows = self._read(lambda conn: conn.execute(query).mappings().all())
        return [_job_from_row(r) for r in rows]

    def next_runnable_job(self, skip: Iterable[str] = ()) -> Job | None:
        """The oldest job that is queued or running (every worker of a fleet joins it), but
        those in `skip` (jobs the caller cannot run)."""
        query = sa.select(jobs.c.id).where(jobs.c.state.in_((JobState.QUEUED, JobState.RUNNING)))
        if skip := list(skip):
            query = query.where(jobs.c.id.not_in(skip))
        job_id = self._read(lambda conn: conn.execute(
            query.order_by(jobs.c.created_at).limit(1)).scalar())
        return self.get_job(job_id) if job_id else None

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> None:
        state = JobState(state)
        self._write(lambda conn: conn.execute(
            jobs.update().where(jobs.c.id == job_id)
            .values(state=state, error=error, updated_at=time.time())))

    def start_job(self, job_id: str, worker_id: str, failed_too: bool = True) -> bool:
        """Mark the job running with `worker_id` on it; False if it is done or cancelled (or
        failed, unless `failed_too`)."""
        startable = [JobState.QUEUED, JobState.RUNNING] + ([JobState.FAILED] if failed_too else [])

        def start(conn: sa.Connection) -> bool:
            started = conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.state.in_(startable))
                .values(state=JobState.RUNNING, updated_at=time.time())).rowcount
            conn.execute(workers.update().where(workers.c.id == worker_id).values(job_id=job_id))
            return started == 1

        return self._write(start)

    def leave_job(self, job_id: str, worker_id: str, state: JobState | None = None,
                  error: str | None = None) -> None:
        """`worker_id` stops working on the job; if it was the last live worker on it, the
        running job takes `state` (queued after a drain, failed after an error).

        NOTE: the job's row is locked first, so two workers leaving at once cannot both see
        the other still on the job and leave it running with nobody on it.
        """
        def leave(conn: sa.Connection) -> None:
            conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())
            conn.execute(workers.update().where(workers.c.id == worker_id).values(job_id=None))
            if state is None:
                return
            others = sa.exists().where(workers.c.job_id == job_id, self._live_worker)
            conn.execute(jobs.update()
                         .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING, ~others)
                         .values(state=JobState(state), error=error, updated_at=time.time()))

        self._write(leave)

    def add_run_time(self, job_id: str, run_s: float) -> None:
        self._write(lambda conn: conn.execute(
            jobs.update().where(jobs.c.id == job_id)
            .values(run_s=jobs.c.run_s + run_s, updated_at=time.time())))

    def save_results(self, job_id: str, results: dict[str, Any]) -> None:
        self._write(lambda conn: conn.execute(
            jobs.update().where(jobs.c.id == job_id)
            .values(results=json.dumps(results), state=JobState.DONE, error=None,
                    updated_at=time.time())))

    def get_results(self, job_id: str) -> dict[str, Any] | None:
        self.get_job(job_id)
        raw = self._read(lambda conn: conn.execute(
            sa.select(jobs.c.results).where(jobs.c.id == job_id)).scalar())
        return json.loads(raw) if raw else None

    # -- items --------------------------------------------------------------------------------

    def add_items(self, job_id: str, work: Sequence[WorkItem]) -> None:
        """Attach items to a job, creating the ones the store has never seen (one transaction).

        New items are claimed in the order they are added (after every item added before).
        """
        self._write(lambda conn: self._attach_items(conn, job_id, work))

    def _attach_items(self, conn: sa.Connection, job_id: str, work: Sequence[WorkItem]) -> None:
        base = conn.execute(sa.select(sa.func.count()).select_from(job_items)
                            .where(job_items.c.job_id == job_id)).scalar()
        # NOTE: two workers adding at once may give items the same position: that only
        # orders claims, it identifies nothing.
        first_seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(items.c.seq), 0))).scalar() + 1
        item_rows = [{"key": w.key, "kind": w.kind, "args": json.dumps(w.args),
                      "state": ItemState.PENDING, "num_runs": 0, "seq": first_seq + i}
                     for i, w in enumerate(work)]
        link_rows = [{"job_id": job_id, "item_key": w.key, "seq": base + i}
                     for i, w in enumerate(work)]
        for chunk in _chunks(item_rows, 500):
            conn.execute(insert_ignore(items, conn), list(chunk))
        for chunk in _chunks(link_rows, 500):
            conn.execute(insert_ignore(job_items, conn), list(chunk))
        total = conn.execute(sa.select(sa.func.count()).select_from(job_items)
                             .where(job_items.c.job_id == job_id)).scalar()
        conn.execute(jobs.update().where(jobs.c.id == job_id)
                     .values(num_total=total, updated_at=time.time()))
        if len(work) >= ANALYZE_AFTER_ITEMS:
            refresh_statistics(conn, [items, job_items])

    def claim_items(self, job_id: str, owner: str, limit: int, kind: str | None = None,
                    held: Iterable[str] = ()) -> list[WorkItem]:
        """Lease up to `limit` of a job's items (of `kind`; None: any) to `owner`: items whose
        lease expired first, then pending ones in the order they were added; each comes
        with its attempt. One short transaction (`leases.claim`).

        `held`: the keys `owner` holds and knows of. If a claim is retried after a lost
        connection, an earlier run may have committed unseen: what `owner` holds beyond
        `held` is given back first, so nothing stays leased to a worker that never ran it.
        """
        keep = frozenset(held)

        def run(retry: bool) -> list[WorkItem]:
            lease = self.leases
            with self.engine.begin() as conn:
                if retry:
                    conn.execute(leases.give_back(owner, keep))
                rows = conn.execute(leases.claim(job_id, owner, limit, kind, self._now,
                                                 lease.lease_s, lease.max_attempts)).all()
            taken = sorted((r for r in rows if r.state == ItemState.RUNNING), key=lambda r: r.seq)
            return [WorkItem(r.key, r.kind, json.loads(r.args), r.num_runs) for r in taken]

        return self._retrying(run)

    def complete_items(self, owner: str, results: Mapping[str, Any],
                       attempts: Mapping[str, int] | None = None) -> int:
        """Commit finished items in one transaction (the batched commit of the runner); returns
        how many were completed.

        NOTE: only items `owner` holds in state running, under the same attempt when
        `attempts` (key -> attempt) is given, are completed: an item whose lease was reclaimed
        keeps the result of the attempt that holds it now. Fencing rests on this guard.
        """
        if not results:
            return 0
        fenced = attempts is not None
        rows = [{"item_key": key, "item_result": json.dumps(value), **_attempt(attempts, key)}
                for key, value in results.items()]

        def run(retry: bool) -> int:
            with self.engine.begin() as conn:
                num = conn.execute(leases.complete(owner, fenced, self._now), rows).rowcount
                if retry:  # an earlier run may have committed them: count what is ours now
                    num = self._count_done_by(conn, owner, list(results))
            return num

        return self._retrying(run)

    def _count_done_by(self, conn: sa.Connection, owner: str, keys: list[str]) -> int:
        return sum(conn.execute(
            sa.select(sa.func.count()).where(items.c.key.in_(chunk), items.c.owner == owner,
                                             items.c.state == ItemState.DONE)).scalar()
            for chunk in _chunks(keys))

    def fail_items(self, owner: str, errors: Mapping[str, str],
                   attempts: Mapping[str, int] | None = None) -> int:
        """Record a failed attempt of each item (key -> error) `owner` holds: back to pending,
        or failed for good after `max_attempts`; fenced like `complete_items`."""
        if not errors:
            return 0
        fenced = attempts is not None
        rows = [{"item_key": key, "item_error": error, **_attempt(attempts, key)}
                for key, error in errors.items()]
        statement = leases.fail(owner, fenced, self.leases.max_attempts)
        return self._write(lambda conn: conn.execute(statement, rows).rowcount)

    def release_items(self, owner: str) -> int:
        """Return every item `owner` holds to pending (a graceful stop or drain)."""
        return self._write(lambda conn: conn.execute(leases.give_back(owner)).rowcount)

    def num_unfinished(self, job_id: str, kind: str | None = None) -> int:
        """The job's items (of `kind`) that are pending or running: still to be computed."""
        in_job = sa.exists().where(job_items.c.job_id == job_id, job_items.c.item_key == items.c.key)
        query = (sa.select(sa.func.count()).select_from(items)
                 .where(items.c.state.in_((ItemState.PENDING, ItemState.RUNNING)), in_job))
        if kind is not None:
            query = query.where(items.c.kind == kind)
        return self._read(lambda conn: conn.execute(query).scalar())

    def item_errors(self, job_id: str, kind: str | None = None,
                    limit: int | None = MAX_ITEM_ERRORS) -> list[dict[str, Any]]:
        """The job's failed items (of `kind`), in job order: key, kind, error, attempts."""
        query = (sa.select(items.c.key, items.c.kind, items.c.error, items.c.num_failures)
                 .join(job_items, job_items.c.item_key == items.c.key)
                 .where(job_items.c.job_id == job_id, items.c.state == ItemState.FAILED)
                 .order_by(job_items.c.seq).limit(limit))
        if kind is not None:
            query = query.where(items.c.kind == kind)
        rows = self._read(lambda conn: conn.execute(query).all())
        return [{"key": r.key, "kind": r.kind, "error": r.error, "attempts": r.num_failures}
                for r in rows]

    def retry_failed_items(self, job_id: str) -> int:
        """Give the job's failed items a fresh set of attempts (an explicit resume)."""
        in_job = sa.exists().where(job_items.c.job_id == job_id, job_items.c.item_key == items.c.key)
        return self._write(lambda conn: conn.execute(
            items.update().where(items.c.state == ItemState.FAILED, in_job)
            .values(state=ItemState.PENDING, owner=None, num_failures=0)).rowcount)

    def results_for(self, keys: Sequence[str]) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for chunk in _chunks(list(keys)):
                rows = conn.execute(
                    sa.select(items.c.key, items.c.result)
                    .where(items.c.key.in_(chunk), items.c.state == ItemState.DONE)).all()
                out.update({r.key: json.loads(r.result) for r in rows})
            return out

        return self._read(read)

    def item_states(self, job_id: str) -> dict[str, int]:
        rows = self._read(lambda conn: conn.execute(
            sa.select(items.c.state, sa.func.count())
            .join(job_items, job_items.c.item_key == items.c.key)
            .where(job_items.c.job_id == job_id).group_by(items.c.state)).all())
        return {state: n for state, n in rows}

    def job_items(self, job_id: str, offset: int = 0,
                  limit: int | None = None) -> list[dict[str, Any]]:
        """A job's items in the order they were added: key, kind, state, result (None unless
        done), and how many of its runs continued a checkpointed generation (`num_resumes`)."""
        rows = self._read(lambda conn: conn.execute(
            sa.select(items.c.key, items.c.kind, items.c.state, items.c.result,
                      item_partials.c.num_resumes)
            .join(job_items, job_items.c.item_key == items.c.key)
            .outerjoin(item_partials, item_partials.c.item_key == items.c.key)
            .where(job_items.c.job_id == job_id).order_by(job_items.c.seq)
            .offset(offset).limit(limit)).all())
        return [{"key": r.key, "kind": r.kind, "state": r.state,
                 "result": json.loads(r.result) if r.state == ItemState.DONE else None,
                 "num_resumes": r.num_resumes or 0} for r in rows]

    # -- partial generations ------------------------------------------------------------------

    def save_partials(self, owner: str, partials: Mapping[str, Sequence[int]],
                      attempts: Mapping[str, int] | None = None) -> int:
        """Checkpoint the tokens generated so far by running items, by key, in one transaction
        (the runner's batched checkpoint); returns how many were saved.

        NOTE: fenced like `complete_items`: only items `owner` holds (under the same attempt,
        when `attempts` is given) are written, so a worker that lost its lease cannot
        overwrite the checkpoint of the attempt that holds the item now.
        """
        if not partials:
            return 0
        now, fenced = time.time(), attempts is not None
        # NOTE: `item_key` names a column of item_partials: bound as "k" in its UPDATE
        held = sa.select(items.c.key).where(leases.held(owner, fenced, key="k"))
        rows = [{"k": key, "t": json.dumps(list(ids)), "n": len(ids),
                 **_attempt(attempts, key)} for key, ids in partials.items()]

        def save(conn: sa.Connection) -> int:
            for chunk in _chunks(list(partials), 500):
                conn.execute(insert_ignore(item_partials, conn), [
                    {"item_key": key, "token_ids": "[]", "num_tokens": 0, "num_resumes": 0,
                     "num_reused_tokens": 0, "updated_at": now} for key in chunk])
            return conn.execute(
                item_partials.update()
                .where(item_partials.c.item_key == sa.bindparam("k"),
                       item_partials.c.item_key.in_(held))
                .values(token_ids=sa.bindparam("t"), num_tokens=sa.bindparam("n"), updated_at=now),
                rows).rowcount

        return self._write(save)

    def resume_partials(self, keys: Sequence[str]) -> dict[str, list[int]]:
        """The checkpointed tokens of items just claimed, by key (those that have any); each
        counts as a resume of its item. One transaction."""
        now = time.time()

        def resume(conn: sa.Connection) -> dict[str, list[int]]:
            out: dict[str, list[int]] = {}
            for chunk in _chunks(list(keys)):
                found = (item_partials.c.item_key.in_(chunk), item_partials.c.num_tokens > 0)
                # NOTE: the write comes first, so SQLite takes its write lock before reading.
                conn.execute(item_partials.update().where(*found).values(
                    num_resumes=item_partials.c.num_resumes + 1, updated_at=now,
                    num_reused_tokens=item_partials.c.num_reused_tokens + item_partials.c.num_tokens))
                rows = conn.execute(sa.select(item_partials.c.item_key, item_partials.c.token_ids)
                                    .where(*found)).all()
                out.update({r.item_key: json.loads(r.token_ids) for r in rows})
            return out

        return self._write(resume)

    def clear_partials(self, keys: Sequence[str]) -> None:
        """Drop the checkpointed tokens of items that are done (their resume counts stay)."""
        done = sa.select(items.c.key).where(items.c.state == ItemState.DONE)

        def clear(conn: sa.Connection) -> None:
            for chunk in _chunks(list(keys)):
                conn.execute(item_partials.update()
                             .where(item_partials.c.item_key.in_(chunk),
                                    item_partials.c.item_key.in_(done))
                             .values(token_ids="[]", num_tokens=0, updated_at=time.time()))

        self._write(clear)

    def partials(self, job_id: str) -> dict[str, list[int]]:
        """The checkpointed tokens of a job's unfinished items, by key."""
        rows = self._read(lambda conn: conn.execute(
            sa.select(item_partials.c.item_key, item_partials.c.token_ids)
            .join(job_items, job_items.c.item_key == item_partials.c.item_key)
            .join(items, items.c.key == item_partials.c.item_key)
            .where(job_items.c.job_id == job_id, items.c.state != ItemState.DONE,
                   item_partials.c.num_tokens > 0)).all())
        return {r.item_key: json.loads(r.token_ids) for r in rows}

    def resumes(self, job_id: str) -> dict[str, dict[str, int]]:
        """Per item of a job that continued a checkpoint: `num_resumes`, `num_reused_tokens`."""
        rows = self._read(lambda conn: conn.execute(
            sa.select(item_partials.c.item_key, item_partials.c.num_resumes,
                      item_partials.c.num_reused_tokens)
            .join(job_items, job_items.c.item_key == item_partials.c.item_key)
            .where(job_items.c.job_id == job_id, item_partials.c.num_resumes > 0)).all())
        return {r.item_key: {"num_resumes": r.num_resumes, "num_reused_tokens": r.num_reused_tokens}
                for r in rows}

    def run_counts(self, job_id: str) -> dict[str, int]:
        """How many times each item of a job was sent to an engine (for durability checks)."""
        rows = self._read(lambda conn: conn.execute(
            sa.select(items.c.key, items.c.num_runs)
            .join(job_items, job_items.c.item_key == items.c.key)
            .where(job_items.c.job_id == job_id)).all())
        return {r.key: r.num_runs for r in rows}

    # -- workers: one heartbeat row per process that claims items -----------------------------

    @property
    def _live_worker(self):
        return sa.and_(workers.c.state == WorkerState.ACTIVE, workers.c.lease_until > self._now)

    def register_worker(self, worker_id: str, host: str, pid: int, label: str) -> None:
        now, lease_s = self._now, self.leases.lease_s
        self._write(lambda conn: conn.execute(insert_ignore(workers, conn).values(
            id=worker_id, host=host, pid=pid, label=label, state=WorkerState.ACTIVE,
            started_at=now, heartbeat_at=now, lease_until=now + lease_s)))

    def renew_lease(self, worker_id: str) -> int:
        """A heartbeat: the worker's row and everything it holds leased `lease_s` from now;
        returns how many items it renewed (all it holds, but those being committed)."""
        now, lease_s = self._now, self.leases.lease_s

        def renew(conn: sa.Connection) -> int:
            conn.execute(workers.update().where(workers.c.id == worker_id)
                         .values(heartbeat_at=now, lease_until=now + lease_s))
            return conn.execute(leases.renew(worker_id, now, lease_s)).rowcount

        return self._write(renew)

    def retire_worker(self, worker_id: str) -> None:
        """A worker stops cleanly: its items back to pending, its row no longer live."""
        def retire(conn: sa.Connection) -> None:
            conn.execute(leases.give_back(worker_id))
            conn.execute(workers.update().where(workers.c.id == worker_id).values(
                state=WorkerState.STOPPED, lease_until=self._now, job_id=None))

        self._write(retire)

    def end_leases(self, worker_ids: Sequence[str]) -> int:
        """Workers known dead (by their host): their leases end now, so the next claim takes
        their items; returns how many items that frees."""
        if not worker_ids:
            return 0

        def end(conn: sa.Connection) -> int:
            conn.execute(workers.update().where(workers.c.id.in_(worker_ids))
                         .values(lease_until=self._now - 1.0))
            return conn.execute(leases.end_leases(list(worker_ids), self._now)).rowcount

        return self._write(end)

    def live_workers(self, host: str | None = None) -> list[dict[str, Any]]:
        """Workers whose lease has not expired (on `host`), oldest first: id, host, pid,
        label, job, started_at, heartbeat age in seconds."""
        now = self._now
        query = (sa.select(workers, (now - workers.c.heartbeat_at).label("heartbeat_age_s"))
                 .where(self._live_worker).order_by(workers.c.started_at))
        if host is not None:
            query = query.where(workers.c.host == host)
        rows = self._read(lambda conn: conn.execute(query).mappings().all())
        return [_worker_from_row(r) for r in rows]

    def job_workers(self, job_id: str) -> list[dict[str, Any]]:
        """Per worker that holds or computed any of the job's items: id, host, label, live,
        done (items it computed), running (items it holds now); most done first."""
        counts = (sa.select(items.c.owner, items.c.state, sa.func.count().label("n"))
                  .join(job_items, job_items.c.item_key == items.c.key)
                  .where(job_items.c.job_id == job_id, items.c.owner.is_not(None),
                         items.c.state.in_((ItemState.DONE, ItemState.RUNNING)))
                  .group_by(items.c.owner, items.c.state))

        def read(conn: sa.Connection):
            found = conn.execute(counts).all()
            owners = sorted({r.owner for r in found})
            rows = conn.execute(sa.select(workers, self._live_worker.label("live"))
                                .where(workers.c.id.in_(owners))).mappings().all() if owners else []
            return found, {r["id"]: r for r in rows}

        found, rows = self._read(read)
        per_worker: dict[str, dict[str, Any]] = {}
        for owner, state, n in found:
            row = rows.get(owner)
            entry = per_worker.setdefault(owner, {
                "id": owner, "host": row["host"] if row else None,
                "label": row["label"] if row else None, "live": bool(row and row["live"]),
                "done": 0, "running": 0})
            entry["done" if state == ItemState.DONE else "running"] += n
        return sorted(per_worker.values(), key=lambda w: (-w["done"], w["id"]))

    # -- latency profiles ---------------------------------------------------------------------

    def save_profile(self, key: Mapping[str, Any], model: dict[str, Any], num_samples: int,
                     fit_error: dict[str, Any] | None = None) -> None:
        """Store a fitted `LatencyModel.to_dict()` under `key` (a value for each of
        PROFILE_KEY_COLUMNS), replacing any profile with the same key."""
        def save(conn: sa.Connection) -> None:
            conn.execute(profiles.delete().where(_profile_key_matches(key)))
            conn.execute(profile_refits.delete().where(_profile_key_matches(key, profile_refits)))
            conn.execute(profiles.insert().values(
                **_profile_key_values(key), model_json=json.dumps(model), num_samples=num_samples,
                fit_error=None if fit_error is None else json.dumps(fit_error),
                created_at=time.time()))

        self._write(save)

    def load_profile(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The profile stored under exactly `key` (every key column equal), or None."""
        rows = self._select_profiles(_profile_key_matches(key))
        return rows[0] if rows else None

    def list_profiles(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every stored profile (of one model), newest first."""
        return self._select_profiles(sa.true() if model is None else profiles.c.model == model)

    def save_refit(self, key: Mapping[str, Any], state: dict[str, Any]) -> None:
        """Store the latest live refit (`RefitStatus.to_dict()`) of the profile under `key`."""
        def save(conn: sa.Connection) -> None:
            conn.execute(profile_refits.delete().where(_profile_key_matches(key, profile_refits)))
            conn.execute(profile_refits.insert().values(
                **_profile_key_values(key), state_json=json.dumps(state), created_at=time.time()))

        self._write(save)

    def load_refit(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The latest live refit stored under exactly `key` (with its `created_at`), or None."""
        row = self._read(lambda conn: conn.execute(sa.select(profile_refits).where(
            _profile_key_matches(key, profile_refits))).mappings().first())
        return None if row is None else {**json.loads(row["state_json"]), "created_at": row["created_at"]}

    def _select_profiles(self, where) -> list[dict[str, Any]]:
        rows = self._read(lambda conn: conn.execute(
            sa.select(profiles).where(where).order_by(profiles.c.created_at.desc())).mappings().all())
        return [_profile_from_row(r) for r in rows]


def _profile_key_values(key: Mapping[str, Any]) -> dict[str, Any]:
    return {name: key[name] for name in PROFILE_KEY_COLUMNS}


def _profile_key_matches(key: Mapping[str, Any], table: sa.Table = profiles):
    return sa.and_(*(table.c[name] == value for name, value in _profile_key_values(key).items()))


def _profile_from_row(r) -> dict[str, Any]:
    return {**{name: r[name] for name in PROFILE_KEY_COLUMNS},
            "latency_model": json.loads(r["model_json"]), "num_samples": r["num_samples"],
            "fit_error": json.loads(r["fit_error"]) if r["fit_error"] else None,
            "created_at": r["created_at"]}


def _job_from_row(r) -> Job:
    return Job(
        id=r["id"], state=JobState(r["state"]), spec=JobSpec.from_dict(json.loads(r["spec"])),
        num_total=r["num_total"], num_done=r["num_done"], created_at=r["created_at"],
        updated_at=r["updated_at"], run_s=r["run_s"], error=r["error"], run_key=r["run_key"],
        num_failed=r["num_failed"],
        num_partial_items=r["num_partial_items"], num_partial_tokens=r["num_partial_tokens"],
    )


def _attempt(attempts: Mapping[str, int] | None, key: str) -> dict[str, int]:
    return {} if attempts is None else {"attempt": attempts[key]}


def _worker_from_row(r) -> dict[str, Any]:
    return {"id": r["id"], "host": r["host"], "pid": r["pid"], "label": r["label"],
            "job": r["job_id"], "started_at": r["started_at"],
            "heartbeat_age_s": round(max(0.0, r["heartbeat_age_s"]), 1)}


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
