"""The durable job store: jobs, work items and their results (SQLAlchemy 2, SQLite default).

A work item is one lm-eval request, keyed by a content hash (request kind, arguments, model,
generation settings), so items are shared across jobs and a rebuilt job reuses every finished
one. This module owns all SQL (tables in `schema`, their history in `migrations`); callers
use the small repository API below and see plain dataclasses. It never talks to the engine
and never holds a transaction open across engine work.

Life of an item (`states.ItemState`): pending -> running (claimed by an owner, e.g.
"host:pid") -> done, completed only by the owner that holds it. Items whose owner died go back
to pending in `requeue_stale`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from conserve_bench.config import JobSpec
from conserve_bench.errors import DatabaseURLError, JobNotFoundError
from conserve_bench.store.db import create_engine, insert_ignore
from conserve_bench.store.migrations import migrate
from conserve_bench.store.schema import (PROFILE_KEY_COLUMNS, items, job_items, jobs,
                                         profile_refits, profiles)
from conserve_bench.store.states import ItemState, JobState

SQLITE_MAX_VARS = 900  # stay under SQLite's bound-parameter limit in IN (...) lists


# -- plain data handed to callers -------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    key: str
    kind: str
    args: dict[str, Any]


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "done": self.num_done,
            "total": self.num_total,
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


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _chunks(seq: Sequence, size: int = SQLITE_MAX_VARS) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


class Store:
    """Repository over one database URL. Safe to share across threads of one process."""

    def __init__(self, url: str):
        self.url = url
        self.engine = create_engine(url)
        try:
            migrate(self.engine)
        except OperationalError as e:
            raise DatabaseURLError(f"cannot open database {url!r}: {e.orig}") from None

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, spec: JobSpec, run_key: str | None = None) -> Job:
        """Record a queued job. With a `run_key` that a job holds already, that job is
        answered instead (whatever its spec: the caller checks), so two racing creators
        end with one job."""
        now = time.time()
        job_id = uuid.uuid4().hex[:12]
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    jobs.insert().values(
                        id=job_id, state=JobState.QUEUED, spec=json.dumps(spec.to_dict()),
                        num_total=0, created_at=now, updated_at=now, run_s=0.0, run_key=run_key,
                    )
                )
        except IntegrityError:
            if run_key is None or (existing := self.job_by_run_key(run_key)) is None:
                raise
            return existing
        return self.get_job(job_id)

    def job_by_run_key(self, run_key: str) -> Job | None:
        found = self._select_jobs(jobs.c.run_key == run_key)
        return found[0] if found else None

    def get_job(self, job_id: str) -> Job:
        jobs_found = self._select_jobs(jobs.c.id == job_id)
        if not jobs_found:
            raise JobNotFoundError(f"no job {job_id!r} in {self.url}")
        return jobs_found[0]

    def list_jobs(self, limit: int = 100) -> list[Job]:
        return self._select_jobs(sa.true(), limit=limit)

    def _select_jobs(self, where, limit: int | None = None) -> list[Job]:
        num_done = (
            sa.select(sa.func.count())
            .select_from(job_items.join(items, items.c.key == job_items.c.item_key))
            .where(job_items.c.job_id == jobs.c.id, items.c.state == ItemState.DONE)
            .scalar_subquery()
        )
        query = sa.select(jobs, num_done.label("num_done")).where(where)
        query = query.order_by(jobs.c.created_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_job_from_row(r) for r in rows]

    def next_runnable_job(self) -> Job | None:
        """The oldest job that is queued or was running (its runner died or was drained)."""
        with self.engine.connect() as conn:
            job_id = conn.execute(
                sa.select(jobs.c.id).where(jobs.c.state.in_((JobState.QUEUED, JobState.RUNNING)))
                .order_by(jobs.c.created_at).limit(1)
            ).scalar()
        return self.get_job(job_id) if job_id else None

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(state=JobState(state), error=error, updated_at=time.time())
            )

    def add_run_time(self, job_id: str, run_s: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(run_s=jobs.c.run_s + run_s, updated_at=time.time())
            )

    def save_results(self, job_id: str, results: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(results=json.dumps(results), state=JobState.DONE, error=None,
                        updated_at=time.time())
            )

    def get_results(self, job_id: str) -> dict[str, Any] | None:
        self.get_job(job_id)
        with self.engine.connect() as conn:
            raw = conn.execute(sa.select(jobs.c.results).where(jobs.c.id == job_id)).scalar()
        return json.loads(raw) if raw else None

    # -- items --------------------------------------------------------------------------------

    def add_items(self, job_id: str, work: Sequence[WorkItem]) -> None:
        """Attach items to a job, creating the ones the store has never seen (one transaction)."""
        with self.engine.begin() as conn:
            base = conn.execute(
                sa.select(sa.func.count()).select_from(job_items)
                .where(job_items.c.job_id == job_id)
            ).scalar()
            item_rows = [
                {"key": w.key, "kind": w.kind, "args": json.dumps(w.args), "state": ItemState.PENDING,
                 "num_runs": 0}
                for w in work
            ]
            link_rows = [
                {"job_id": job_id, "item_key": w.key, "seq": base + i} for i, w in enumerate(work)
            ]
            for chunk in _chunks(item_rows, 500):
                conn.execute(insert_ignore(items, conn), list(chunk))
            for chunk in _chunks(link_rows, 500):
                conn.execute(insert_ignore(job_items, conn), list(chunk))
            total = conn.execute(
                sa.select(sa.func.count()).select_from(job_items)
                .where(job_items.c.job_id == job_id)
            ).scalar()
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(num_total=total, updated_at=time.time())
            )

    def claim_items(
        self, job_id: str, owner: str, limit: int, kind: str | None = None
    ) -> list[WorkItem]:
        """Mark up to `limit` pending items of a job as running for `owner`, in job order."""
        with self.engine.begin() as conn:
            query = (
                sa.select(items.c.key, items.c.kind, items.c.args)
                .join(job_items, job_items.c.item_key == items.c.key)
                .where(job_items.c.job_id == job_id, items.c.state == ItemState.PENDING)
                .order_by(job_items.c.seq)
                .limit(limit)
            )
            if kind is not None:
                query = query.where(items.c.kind == kind)
            rows = conn.execute(query).all()
            candidates = [WorkItem(r.key, r.kind, json.loads(r.args)) for r in rows]
            got: set[str] = set()
            for chunk in _chunks([w.key for w in candidates]):
                # NOTE: the state guard makes a claim race between two owners harmless:
                # whoever updates second gets none of the rows the first took, and returns
                # only the rows its own update changed.
                got.update(conn.execute(
                    items.update()
                    .where(items.c.key.in_(chunk), items.c.state == ItemState.PENDING)
                    .values(state=ItemState.RUNNING, owner=owner, claimed_at=time.time(),
                            num_runs=items.c.num_runs + 1)
                    .returning(items.c.key)
                ).scalars())
        return [w for w in candidates if w.key in got]

    def complete_items(self, owner: str, results: Mapping[str, Any]) -> int:
        """Commit finished items in one transaction (the batched commit of the runner); returns
        how many were completed.

        NOTE: only items `owner` holds in state running are completed: an item given back to
        pending (its owner presumed dead) or claimed by another owner since keeps that owner's
        result. Fencing a presumed-dead worker rests on this guard.
        """
        if not results:
            return 0
        now = time.time()
        with self.engine.begin() as conn:
            return conn.execute(
                items.update()
                .where(items.c.key == sa.bindparam("k"), items.c.owner == owner,
                       items.c.state == ItemState.RUNNING)
                .values(state=ItemState.DONE, result=sa.bindparam("r"), finished_at=now,
                        owner=None),
                [{"k": key, "r": json.dumps(value)} for key, value in results.items()],
            ).rowcount

    def release_items(self, owner: str) -> int:
        """Return every item `owner` holds to pending (a graceful stop or drain)."""
        with self.engine.begin() as conn:
            return conn.execute(
                items.update()
                .where(items.c.owner == owner, items.c.state == ItemState.RUNNING)
                .values(state=ItemState.PENDING, owner=None, claimed_at=None)
            ).rowcount

    def requeue_stale(self, lease_s: float = 600.0) -> int:
        """Return items of dead owners to pending.

        An owner on this host is dead when its pid is gone; an owner elsewhere is presumed
        dead once its claim is older than `lease_s`.
        """
        host = socket.gethostname()
        with self.engine.begin() as conn:
            running = conn.execute(
                sa.select(items.c.owner, sa.func.min(items.c.claimed_at))
                .where(items.c.state == ItemState.RUNNING).group_by(items.c.owner)
            ).all()
            dead = [o for o, claimed_at in running if _owner_is_dead(o, claimed_at, host, lease_s)]
            num = 0
            for chunk in _chunks(dead):
                num += conn.execute(
                    items.update()
                    .where(items.c.owner.in_(chunk), items.c.state == ItemState.RUNNING)
                    .values(state=ItemState.PENDING, owner=None, claimed_at=None)
                ).rowcount
        return num

    def results_for(self, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(keys)):
                rows = conn.execute(
                    sa.select(items.c.key, items.c.result)
                    .where(items.c.key.in_(chunk), items.c.state == ItemState.DONE)
                ).all()
                out.update({r.key: json.loads(r.result) for r in rows})
        return out

    def item_states(self, job_id: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(items.c.state, sa.func.count())
                .join(job_items, job_items.c.item_key == items.c.key)
                .where(job_items.c.job_id == job_id).group_by(items.c.state)
            ).all()
        return {state: n for state, n in rows}

    def job_items(self, job_id: str, offset: int = 0,
                  limit: int | None = None) -> list[dict[str, Any]]:
        """A job's items in the order they were added: key, kind, state, result (None unless done)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(items.c.key, items.c.kind, items.c.state, items.c.result)
                .join(job_items, job_items.c.item_key == items.c.key)
                .where(job_items.c.job_id == job_id).order_by(job_items.c.seq)
                .offset(offset).limit(limit)
            ).all()
        return [{"key": r.key, "kind": r.kind, "state": r.state,
                 "result": json.loads(r.result) if r.state == ItemState.DONE else None} for r in rows]

    def run_counts(self, job_id: str) -> dict[str, int]:
        """How many times each item of a job was sent to an engine (for durability checks)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(items.c.key, items.c.num_runs)
                .join(job_items, job_items.c.item_key == items.c.key)
                .where(job_items.c.job_id == job_id)
            ).all()
        return {r.key: r.num_runs for r in rows}

    # -- latency profiles ---------------------------------------------------------------------

    def save_profile(self, key: Mapping[str, Any], model: dict[str, Any], num_samples: int,
                     fit_error: dict[str, Any] | None = None) -> None:
        """Store a fitted `LatencyModel.to_dict()` under `key` (a value for each of
        PROFILE_KEY_COLUMNS), replacing any profile with the same key."""
        with self.engine.begin() as conn:
            conn.execute(profiles.delete().where(_profile_key_matches(key)))
            conn.execute(profile_refits.delete().where(_profile_key_matches(key, profile_refits)))
            conn.execute(profiles.insert().values(
                **_profile_key_values(key), model_json=json.dumps(model), num_samples=num_samples,
                fit_error=None if fit_error is None else json.dumps(fit_error),
                created_at=time.time()))

    def load_profile(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The profile stored under exactly `key` (every key column equal), or None."""
        rows = self._select_profiles(_profile_key_matches(key))
        return rows[0] if rows else None

    def list_profiles(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every stored profile (of one model), newest first."""
        return self._select_profiles(sa.true() if model is None else profiles.c.model == model)

    def save_refit(self, key: Mapping[str, Any], state: dict[str, Any]) -> None:
        """Store the latest live refit (`RefitStatus.to_dict()`) of the profile under `key`."""
        with self.engine.begin() as conn:
            conn.execute(profile_refits.delete().where(_profile_key_matches(key, profile_refits)))
            conn.execute(profile_refits.insert().values(
                **_profile_key_values(key), state_json=json.dumps(state), created_at=time.time()))

    def load_refit(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The latest live refit stored under exactly `key` (with its `created_at`), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(profile_refits).where(
                _profile_key_matches(key, profile_refits))).mappings().first()
        return None if row is None else {**json.loads(row["state_json"]), "created_at": row["created_at"]}

    def _select_profiles(self, where) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(profiles).where(where)
                                .order_by(profiles.c.created_at.desc())).mappings().all()
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


def _owner_is_dead(owner: str | None, claimed_at: float | None, host: str, lease_s: float) -> bool:
    if owner is None:
        return True
    owner_host, _, pid = owner.rpartition(":")
    if owner_host == host and pid.isdigit():
        return not _pid_alive(int(pid))
    return claimed_at is None or time.time() - claimed_at > lease_s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_from_row(r) -> Job:
    return Job(
        id=r["id"], state=JobState(r["state"]), spec=JobSpec.from_dict(json.loads(r["spec"])),
        num_total=r["num_total"], num_done=r["num_done"], created_at=r["created_at"],
        updated_at=r["updated_at"], run_s=r["run_s"], error=r["error"], run_key=r["run_key"],
    )
