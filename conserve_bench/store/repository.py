"""The durable job store: jobs, work items and their results (SQLAlchemy 2, SQLite default).

A work item is one lm-eval request, keyed by a content hash (request kind, arguments, model,
generation settings), so items are shared across jobs and a rebuilt job reuses every finished
one. This package owns all SQL (tables in `schema`, their history in `migrations`, the leased
work statements in `leases`; the connection and its retries in `base`, saved tokens in
`partials`, heartbeats in `replicas`, latency profiles in `profile_rows`); callers use the
small repository API of `Store` and see plain dataclasses. It never talks to the engine and
never holds a transaction open across engine work.

Life of an item (`states.ItemState`): pending -> running (leased by one replica until
`lease_until` on the database's clock, renewed by its heartbeat) -> done, committed only by
the replica and attempt that hold it; or back to pending (given back, or its attempt failed),
or taken by another replica's claim once the lease expired; failed after `max_attempts` failed
attempts. Several processes on several machines may share one PostgreSQL store this way.
A passing outage (a restart of the database) is retried for up to one lease.
A running `generate_until` item's tokens so far are saved (`save_partials`, by the
replica and attempt that hold it) and handed to its next run (`resume_partials`), so an
interrupted generation continues instead of starting over.

Life of a job (`states.JobState`): every write that moves a job between states is a single
conditional UPDATE (compare-and-set), so two writers racing (a cancel and a finishing run, a
re-post and the pump) cannot undo each other: a done job is never cancelled, a cancelled one
never gets results, a failed one is requeued (its failed items with it) once.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from conserve_bench.config import JobSpec
from conserve_bench.errors import JobNotFoundError
from conserve_bench.store import leases
from conserve_bench.store.base import attempt_param, chunks
from conserve_bench.store.db import insert_ignore, refresh_statistics
from conserve_bench.store.batch_rows import BatchRows
from conserve_bench.store.partials import PartialRows
from conserve_bench.store.profile_rows import ProfileRows
from conserve_bench.store.schema import item_partials, items, job_items, jobs, workers
from conserve_bench.store.states import CANCELLABLE_JOB_STATES, ItemState, JobState
from conserve_bench.store.replicas import OWNED_STATES, ReplicaRows

MAX_ITEM_ERRORS = 5  # failed items `item_errors` lists
ANALYZE_AFTER_ITEMS = 1000  # items added at once that refresh the planner's statistics


# -- plain data handed to callers -------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """One request: `kind` an lm-eval request type, `args` its arguments as lm-eval made them
    (`[context, continuation]`, `[text]`, `[context, gen_kwargs]`; stored as JSON). `attempt`:
    which claim of it this is (set by `claim_items`; it fences the completion)."""

    key: str
    kind: str
    args: Any
    attempt: int = 0


def item_key(kind: str, args: list[Any], model_fingerprint: str) -> str:
    """Content hash of one request: same request, same model and settings -> same key.

    NOTE: an item's identity in the store: a request computed once, by any job on an engine of
    the same fingerprint, is never computed again.
    """
    blob = json.dumps([kind, args, model_fingerprint], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def keyed_items(requests: Sequence[tuple[str, list[Any]]],
                model_fingerprint: str) -> tuple[list[str], list[WorkItem]]:
    """Each (kind, args) request's item key, in request order, and one work item per key."""
    keys = [item_key(kind, args, model_fingerprint) for kind, args in requests]
    unique = {k: WorkItem(k, kind, args) for k, (kind, args) in zip(keys, requests)}
    return keys, list(unique.values())


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
    num_partial_items: int = 0  # unfinished items with saved tokens (partials)
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


class Store(PartialRows, ReplicaRows, ProfileRows, BatchRows):
    """Repository over one database URL (`base.StoreBase`): jobs and their work items here,
    partial generations, replicas and profiles from its parts. Safe to share across threads
    of one process."""

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
            raise JobNotFoundError(f"no job {job_id!r} in the store")
        return jobs_found[0]

    def job_spec(self, job_id: str) -> JobSpec:
        """Just what the job runs (no item counts)."""
        spec = self._read(lambda conn: conn.execute(
            sa.select(jobs.c.spec).where(jobs.c.id == job_id)).scalar())
        if spec is None:
            raise JobNotFoundError(f"no job {job_id!r} in the store")
        return JobSpec.from_dict(json.loads(spec))

    def get_job_state(self, job_id: str) -> JobState:
        """Just the state (cheap: no item counts), e.g. to notice a cancel between commits."""
        state = self._read(lambda conn: conn.execute(
            sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar())
        if state is None:
            raise JobNotFoundError(f"no job {job_id!r} in the store")
        return JobState(state)

    def list_jobs(self, limit: int | None = None) -> list[Job]:
        """Jobs, newest first; the newest `limit` of them."""
        return self._select_jobs(sa.true(), limit=limit)

    def num_jobs(self) -> int:
        return self._read(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar())

    def job_status(self, job_id: str) -> tuple[Job, list[dict[str, Any]]]:
        """The job and, per replica that holds or computed any of its items, its done and
        running items (most done first), from one count of its items: what a status poll
        reads."""
        def read(conn: sa.Connection):
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().one_or_none()
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r} in the store")
            live = _progress(conn, [job_id], by_owner=True).get(job_id, _Progress())
            return _job_from_row(row, _settled(row) or live), self._replicas_of(conn, live.by_owner)

        return self._read(read)

    def _select_jobs(self, where, limit: int | None = None) -> list[Job]:
        query = sa.select(jobs).where(where).order_by(jobs.c.created_at.desc()).limit(limit)

        def read(conn: sa.Connection):
            rows = conn.execute(query).mappings().all()
            settled = {r["id"]: _settled(r) for r in rows}
            live = _progress(conn, [job_id for job_id, counts in settled.items() if counts is None])
            return [_job_from_row(r, settled[r["id"]] or live.get(r["id"], _Progress())) for r in rows]

        return self._read(read)

    def next_runnable_job(self, skip: Iterable[str] = ()) -> Job | None:
        """The oldest job that is queued or running (every replica of a fleet joins it), but
        those in `skip` (jobs the caller cannot run)."""
        query = sa.select(jobs.c.id).where(jobs.c.state.in_((JobState.QUEUED, JobState.RUNNING)))
        if skip := list(skip):
            query = query.where(jobs.c.id.not_in(skip))
        job_id = self._read(lambda conn: conn.execute(
            query.order_by(jobs.c.created_at).limit(1)).scalar())
        return self.get_job(job_id) if job_id else None

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None,
                      only_from: Iterable[JobState] | None = None) -> bool:
        """Put the job in `state`; with `only_from`, only if it is in one of those states now
        (one conditional UPDATE). True if the job changed."""
        state = JobState(state)
        where = [jobs.c.id == job_id]
        if only_from is not None:
            where.append(jobs.c.state.in_([JobState(s) for s in only_from]))
        return self._write(lambda conn: conn.execute(
            jobs.update().where(*where)
            .values(state=state, error=error, updated_at=time.time())).rowcount == 1)

    def cancel_job(self, job_id: str) -> bool:
        """Cancel the job if it is queued, running or failed (one conditional UPDATE): True
        if this call cancelled it, False if it was done or cancelled already (left as it
        was). Its replicas notice at their next check and give their items back."""
        def cancel(conn: sa.Connection) -> bool:
            return conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.state.in_(CANCELLABLE_JOB_STATES))
                .values(state=JobState.CANCELLED, updated_at=time.time())).rowcount == 1

        if self._write(cancel):
            return True
        self.get_job_state(job_id)  # NOTE: JobNotFoundError for a job that does not exist
        return False

    def requeue_failed_job(self, job_id: str) -> bool:
        """A failed job back to queued, its failed items given a fresh set of attempts, in
        one transaction: True if it was failed (and is queued now), False otherwise (nothing
        changed). The job API's re-post of a failed job's `run_key` calls this: the pump,
        which never retries failed items itself, then runs it again.

        NOTE: the state is compared and set first, so of two racing re-posts only one
        retries the items, and a job cancelled meanwhile keeps its failed items.
        """
        def requeue(conn: sa.Connection) -> bool:
            requeued = conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.state == JobState.FAILED)
                .values(state=JobState.QUEUED, error=None, updated_at=time.time())).rowcount
            if requeued:
                conn.execute(_retry_failed(job_id))
            return requeued == 1

        return self._write(requeue)

    def start_job(self, job_id: str, replica_id: str, failed_too: bool = True) -> bool:
        """Mark the job running with `replica_id` on it; False if it is done or cancelled (or
        failed, unless `failed_too`)."""
        startable = [JobState.QUEUED, JobState.RUNNING] + ([JobState.FAILED] if failed_too else [])

        def start(conn: sa.Connection) -> bool:
            started = conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.state.in_(startable))
                .values(state=JobState.RUNNING, updated_at=time.time())).rowcount
            conn.execute(workers.update().where(workers.c.id == replica_id).values(job_id=job_id))
            return started == 1

        return self._write(start)

    def leave_job(self, job_id: str, replica_id: str, state: JobState | None = None,
                  error: str | None = None) -> None:
        """`replica_id` stops working on the job; if it was the last live replica on it, the
        running job takes `state` (queued after a drain, failed after an error).

        NOTE: the job's row is locked first, so two replicas leaving at once cannot both see
        the other still on the job and leave it running with nobody on it.
        """
        def leave(conn: sa.Connection) -> None:
            conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id).with_for_update())
            conn.execute(workers.update().where(workers.c.id == replica_id).values(job_id=None))
            if state is None:
                return
            others = sa.exists().where(workers.c.job_id == job_id, self._live_replica)
            conn.execute(jobs.update()
                         .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING, ~others)
                         .values(state=JobState(state), error=error, updated_at=time.time()))

        self._write(leave)

    def add_run_time(self, job_id: str, run_s: float) -> None:
        self._write(lambda conn: conn.execute(
            jobs.update().where(jobs.c.id == job_id)
            .values(run_s=jobs.c.run_s + run_s, updated_at=time.time())))

    def save_results(self, job_id: str, results: dict[str, Any]) -> bool:
        """The job done with its `results`, in one write (a job seen done has its results);
        False, and nothing saved, if it was cancelled meanwhile (or does not exist).

        NOTE: conditional on the job not being cancelled: a cancel that won the race stays
        a cancel. A job done already (another replica finished it too) gets these results.
        Its item counts are kept with them (`_settled`): a done job's items are all settled,
        and listing jobs then counts only the live ones' items.
        """
        def save(conn: sa.Connection) -> bool:
            progress = _progress(conn, [job_id]).get(job_id, _Progress())
            return conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.state != JobState.CANCELLED)
                .values(results=json.dumps(results), state=JobState.DONE, error=None,
                        progress=json.dumps(progress.counts()), updated_at=time.time())).rowcount == 1

        return self._write(save)

    def get_results(self, job_id: str) -> dict[str, Any] | None:
        self.get_job_state(job_id)  # NOTE: JobNotFoundError for a job that does not exist
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
        # NOTE: two replicas adding at once may give items the same position: that only
        # orders claims, it identifies nothing.
        first_seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(items.c.seq), 0))).scalar() + 1
        item_rows = [{"key": w.key, "kind": w.kind, "args": json.dumps(w.args),
                      "state": ItemState.PENDING, "num_runs": 0, "seq": first_seq + i}
                     for i, w in enumerate(work)]
        link_rows = [{"job_id": job_id, "item_key": w.key, "seq": base + i}
                     for i, w in enumerate(work)]
        for chunk in chunks(item_rows, 500):
            conn.execute(insert_ignore(items, conn), list(chunk))
        for chunk in chunks(link_rows, 500):
            conn.execute(insert_ignore(job_items, conn), list(chunk))
        total = conn.execute(sa.select(sa.func.count()).select_from(job_items)
                             .where(job_items.c.job_id == job_id)).scalar()
        conn.execute(jobs.update().where(jobs.c.id == job_id)
                     .values(num_total=total, updated_at=time.time()))
        if len(work) >= ANALYZE_AFTER_ITEMS:
            refresh_statistics(conn, [items.name, job_items.name])

    def claim_items(self, job_id: str, owner: str, limit: int, kind: str | None = None,
                    held: Iterable[str] = ()) -> list[WorkItem]:
        """Lease up to `limit` of a job's items (of `kind`; None: any) to `owner`: items whose
        lease expired first, then pending ones in the order they were added; each comes
        with its attempt. One short transaction (`leases.claim`).

        `held`: the keys `owner` holds and knows of. If a claim is retried after a lost
        connection, an earlier run may have committed unseen: what `owner` holds beyond
        `held` is given back first, so nothing stays leased to a replica that never ran it.
        """
        keep = frozenset(held)

        def run(retry: bool) -> list[WorkItem]:
            lease = self.leases
            with self._begin() as conn:
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
        rows = [{"item_key": key, "item_result": json.dumps(value), **attempt_param(attempts, key)}
                for key, value in results.items()]

        def run(retry: bool) -> int:
            with self._begin() as conn:
                num = conn.execute(leases.complete(owner, fenced, self._now), rows).rowcount
                if retry:  # an earlier run may have committed them: count what is ours now
                    num = self._count_done_by(conn, owner, list(results))
            return num

        return self._retrying(run)

    def _count_done_by(self, conn: sa.Connection, owner: str, keys: list[str]) -> int:
        return sum(conn.execute(
            sa.select(sa.func.count()).where(items.c.key.in_(chunk), items.c.owner == owner,
                                             items.c.state == ItemState.DONE)).scalar()
            for chunk in chunks(keys))

    def fail_items(self, owner: str, errors: Mapping[str, str],
                   attempts: Mapping[str, int] | None = None) -> int:
        """Record a failed attempt of each item (key -> error) `owner` holds: back to pending,
        or failed for good after `max_attempts`; fenced like `complete_items`."""
        if not errors:
            return 0
        fenced = attempts is not None
        rows = [{"item_key": key, "item_error": error, **attempt_param(attempts, key)}
                for key, error in errors.items()]
        statement = leases.fail(owner, fenced, self.leases.max_attempts)
        return self._write(lambda conn: conn.execute(statement, rows).rowcount)

    def release_items(self, owner: str, keep: Iterable[str] = ()) -> int:
        """Return every item `owner` holds, but those of `keep`, to pending (a graceful stop
        or drain; or, at a run's start, what its replica's runners lost track of)."""
        statement = leases.give_back(owner, frozenset(keep))
        return self._write(lambda conn: conn.execute(statement).rowcount)

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
        return self._write(lambda conn: conn.execute(_retry_failed(job_id)).rowcount)

    def results_for(self, keys: Sequence[str]) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for chunk in chunks(list(keys)):
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

    def job_items(self, job_id: str, offset: int = 0, limit: int | None = None,
                  with_args: bool = False) -> list[dict[str, Any]]:
        """A job's items in the order they were added: key, kind, state, result (None unless
        done), how many of its runs continued a saved partial (`num_resumes`), and
        with `with_args` the request's arguments as lm-eval made them (`args`)."""
        columns = [items.c.key, items.c.kind, items.c.state, items.c.result,
                   item_partials.c.num_resumes, *([items.c.args] if with_args else [])]
        rows = self._read(lambda conn: conn.execute(
            sa.select(*columns)
            .join(job_items, job_items.c.item_key == items.c.key)
            .outerjoin(item_partials, item_partials.c.item_key == items.c.key)
            .where(job_items.c.job_id == job_id).order_by(job_items.c.seq)
            .offset(offset).limit(limit)).all())
        return [{"key": r.key, "kind": r.kind, "state": r.state,
                 "result": json.loads(r.result) if r.state == ItemState.DONE else None,
                 "num_resumes": r.num_resumes or 0,
                 **({"args": json.loads(r.args)} if with_args else {})} for r in rows]

    def run_counts(self, job_id: str) -> dict[str, int]:
        """How many times each item of a job was sent to an engine (for durability checks)."""
        rows = self._read(lambda conn: conn.execute(
            sa.select(items.c.key, items.c.num_runs)
            .join(job_items, job_items.c.item_key == items.c.key)
            .where(job_items.c.job_id == job_id)).all())
        return {r.key: r.num_runs for r in rows}


def _retry_failed(job_id: str) -> sa.Update:
    """The job's failed items back to pending, with a fresh set of attempts."""
    in_job = sa.exists().where(job_items.c.job_id == job_id, job_items.c.item_key == items.c.key)
    return (items.update().where(items.c.state == ItemState.FAILED, in_job)
            .values(state=ItemState.PENDING, owner=None, num_failures=0))


SETTLED_COUNTS = ("num_done", "num_failed", "num_partial_items", "num_partial_tokens")  # `_Progress`'s kept


@dataclass
class _Progress:
    """A job's items counted: done, failed, unfinished with saved tokens (and those tokens),
    and its done and running items by owner, as `(owner, state, items)`."""

    num_done: int = 0
    num_failed: int = 0
    num_partial_items: int = 0
    num_partial_tokens: int = 0
    by_owner: list[tuple[str, str, int]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SETTLED_COUNTS}

    def add(self, owner: str | None, state: str | None, num: int, num_done: int, num_failed: int,
            num_partial: int, partial_tokens: int) -> None:
        self.num_done += num_done
        self.num_failed += num_failed
        self.num_partial_items += num_partial
        self.num_partial_tokens += partial_tokens
        if owner is not None and state in OWNED_STATES:
            self.by_owner.append((owner, state, num))


def _settled(row) -> _Progress | None:
    """A done job's counts, kept with its results; None for a job whose items may still
    change (any other state: counted live)."""
    if row["progress"] and row["state"] == JobState.DONE:
        return _Progress(**json.loads(row["progress"]))
    return None


def _progress(conn: sa.Connection, job_ids: list[str], by_owner: bool = False) -> dict[str, _Progress]:
    """Each job's `_Progress` (`by_owner`: with its replicas' counts), from one pass over its
    items that reads `ix_items_progress` (and a partial's row only for an item that has one):
    a status poll walks an index, never the items' prompts and results. NOTE: grouping by
    owner too sorts the items (56 ms for all of MMLU on 2 CPU cores, against 29)."""
    saved = sa.and_(items.c.state != ItemState.DONE, item_partials.c.num_tokens > 0)
    keys = (job_items.c.job_id, items.c.owner, items.c.state) if by_owner else (job_items.c.job_id,)
    query = (sa.select(*keys, sa.func.count(), _num(items.c.state == ItemState.DONE),
                       _num(items.c.state == ItemState.FAILED), _num(saved),
                       _num(saved, item_partials.c.num_tokens))
             .select_from(job_items.join(items, items.c.key == job_items.c.item_key)
                          .outerjoin(item_partials, item_partials.c.item_key == items.c.key))
             .group_by(*keys))
    progress: dict[str, _Progress] = {}
    for chunk in chunks(job_ids):
        for row in conn.execute(query.where(job_items.c.job_id.in_(chunk))):
            job_id, owner, state = row[:3] if by_owner else (row[0], None, None)
            progress.setdefault(job_id, _Progress()).add(owner, state, *(int(n) for n in row[len(keys):]))
    return progress


def _num(condition, value=1) -> sa.ColumnElement:
    """How many rows meet `condition` (with `value`, the sum of it over those rows)."""
    return sa.func.coalesce(sa.func.sum(sa.case((condition, value), else_=0)), 0)


def _job_from_row(r, progress: _Progress) -> Job:
    return Job(
        id=r["id"], state=JobState(r["state"]), spec=JobSpec.from_dict(json.loads(r["spec"])),
        num_total=r["num_total"], num_done=progress.num_done, created_at=r["created_at"],
        updated_at=r["updated_at"], run_s=r["run_s"], error=r["error"], run_key=r["run_key"],
        num_failed=progress.num_failed, num_partial_items=progress.num_partial_items,
        num_partial_tokens=progress.num_partial_tokens,
    )
