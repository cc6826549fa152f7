"""The durable job store: jobs, work items and their results (SQLAlchemy 2, SQLite default).

A work item is one lm-eval request, keyed by a content hash (request kind, arguments, model,
generation settings), so items are shared across jobs and a rebuilt job reuses every finished
one. This module owns all SQL; callers use the small repository API below. It never talks to
the engine and never holds a transaction open across engine work.

Life of an item: pending -> running (claimed by an owner, e.g. "host:pid") -> done.
Items whose owner died go back to pending in `requeue_stale`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from conserve_bench.config import JobSpec
from conserve_bench.errors import DatabaseURLError, JobNotFoundError

if TYPE_CHECKING:
    from conserve_bench.sched.profiles import ProfileKey

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
SQLITE_MAX_VARS = 900  # stay under SQLite's bound-parameter limit in IN (...) lists

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata, sa.Column("version", sa.Integer, nullable=False)
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("num_total", sa.Integer, nullable=False, default=0),
    sa.Column("results", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("run_s", sa.Float, nullable=False, default=0.0),
    sa.Column("run_key", sa.String(200)),  # from m003; unique, see `_m003_run_key`
)

items = sa.Table(
    "items",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("args", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("result", sa.Text),
    sa.Column("owner", sa.String(128)),
    sa.Column("claimed_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("num_runs", sa.Integer, nullable=False, default=0),
)

job_items = sa.Table(
    "job_items",
    metadata,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("item_key", sa.String(64), sa.ForeignKey("items.key"), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Index("ix_job_items_item", "item_key"),
)

# NOTE: a profile is valid only for its exact key (model, dtype, device, vLLM version, parallel
# size); the key is the primary key so that re-profiling replaces, never duplicates.
profiles = sa.Table(
    "profiles",
    metadata,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("dtype", sa.String(32), primary_key=True),
    sa.Column("device", sa.String(256), primary_key=True),
    sa.Column("vllm_version", sa.String(64), primary_key=True),
    sa.Column("parallel_size", sa.Integer, primary_key=True),
    sa.Column("model_json", sa.Text, nullable=False),
    sa.Column("num_samples", sa.Integer, nullable=False),
    sa.Column("fit_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
)

PROFILE_KEY_COLUMNS = ("model", "dtype", "device", "vllm_version", "parallel_size")

# -- migrations: ordered, named, each run once; version N means the first N have run ----------


def _m001_initial(conn: sa.Connection) -> None:
    for table in (jobs, items, job_items):
        table.create(conn, checkfirst=True)


def _m002_profiles(conn: sa.Connection) -> None:
    profiles.create(conn, checkfirst=True)


def _m003_run_key(conn: sa.Connection) -> None:
    """A caller's name for a job (`ci --run-key`), unique, so that a rerun finds its job."""
    # NOTE: m001 creates `jobs` from the table above, which has the column already; only a
    # store made before m003 existed needs it added.
    if "run_key" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN run_key VARCHAR(200)"))
    # NOTE: unique, yet many jobs have none: SQLite and PostgreSQL never count NULLs as equal.
    conn.execute(sa.text("CREATE UNIQUE INDEX IF NOT EXISTS ux_jobs_run_key ON jobs (run_key)"))


MIGRATIONS = [_m001_initial, _m002_profiles, _m003_run_key]


def migrate(engine: sa.Engine) -> int:
    """Bring a database to the latest schema; returns the resulting version."""
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(sa.select(schema_version.c.version)).scalar()
        if current is None:
            conn.execute(schema_version.insert().values(version=0))
            current = 0
        for migration in MIGRATIONS[current:]:
            migration(conn)
        conn.execute(schema_version.update().values(version=len(MIGRATIONS)))
    return len(MIGRATIONS)


# -- plain data handed to callers -------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    key: str
    kind: str
    args: dict[str, Any]


@dataclass(frozen=True)
class Job:
    id: str
    state: str
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
            "state": self.state,
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
        self.engine = _create_engine(url)
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
                        id=job_id, state="queued", spec=json.dumps(spec.to_dict()),
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
            .where(job_items.c.job_id == jobs.c.id, items.c.state == "done")
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
                sa.select(jobs.c.id).where(jobs.c.state.in_(("queued", "running")))
                .order_by(jobs.c.created_at).limit(1)
            ).scalar()
        return self.get_job(job_id) if job_id else None

    def set_job_state(self, job_id: str, state: str, error: str | None = None) -> None:
        assert state in JOB_STATES, state
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(state=state, error=error, updated_at=time.time())
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
                .values(results=json.dumps(results), state="done", error=None,
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
                {"key": w.key, "kind": w.kind, "args": json.dumps(w.args), "state": "pending",
                 "num_runs": 0}
                for w in work
            ]
            link_rows = [
                {"job_id": job_id, "item_key": w.key, "seq": base + i} for i, w in enumerate(work)
            ]
            for chunk in _chunks(item_rows, 500):
                conn.execute(_insert_ignore(items, conn), list(chunk))
            for chunk in _chunks(link_rows, 500):
                conn.execute(_insert_ignore(job_items, conn), list(chunk))
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
                .where(job_items.c.job_id == job_id, items.c.state == "pending")
                .order_by(job_items.c.seq)
                .limit(limit)
            )
            if kind is not None:
                query = query.where(items.c.kind == kind)
            rows = conn.execute(query).all()
            claimed = [WorkItem(r.key, r.kind, json.loads(r.args)) for r in rows]
            for chunk in _chunks([w.key for w in claimed]):
                # NOTE: the state guard makes a claim race between two owners harmless:
                # whoever updates second changes nothing for rows it did not get.
                conn.execute(
                    items.update()
                    .where(items.c.key.in_(chunk), items.c.state == "pending")
                    .values(state="running", owner=owner, claimed_at=time.time(),
                            num_runs=items.c.num_runs + 1)
                )
        return claimed

    def complete_items(self, owner: str, results: dict[str, Any]) -> None:
        """Commit finished items in one transaction (the batched commit of the runner)."""
        if not results:
            return
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                items.update()
                .where(items.c.key == sa.bindparam("k"))
                .values(state="done", result=sa.bindparam("r"), finished_at=now, owner=None),
                [{"k": key, "r": json.dumps(value)} for key, value in results.items()],
            )

    def release_items(self, owner: str) -> int:
        """Return every item `owner` holds to pending (a graceful stop or drain)."""
        with self.engine.begin() as conn:
            return conn.execute(
                items.update()
                .where(items.c.owner == owner, items.c.state == "running")
                .values(state="pending", owner=None, claimed_at=None)
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
                .where(items.c.state == "running").group_by(items.c.owner)
            ).all()
            dead = [o for o, claimed_at in running if _owner_is_dead(o, claimed_at, host, lease_s)]
            num = 0
            for chunk in _chunks(dead):
                num += conn.execute(
                    items.update()
                    .where(items.c.owner.in_(chunk), items.c.state == "running")
                    .values(state="pending", owner=None, claimed_at=None)
                ).rowcount
        return num

    def results_for(self, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(keys)):
                rows = conn.execute(
                    sa.select(items.c.key, items.c.result)
                    .where(items.c.key.in_(chunk), items.c.state == "done")
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
                 "result": json.loads(r.result) if r.state == "done" else None} for r in rows]

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

    def save_profile(self, key: ProfileKey, model: dict[str, Any], num_samples: int,
                     fit_error: dict[str, Any] | None = None) -> None:
        """Store a fitted `LatencyModel.to_dict()`, replacing any profile with the same key."""
        with self.engine.begin() as conn:
            conn.execute(profiles.delete().where(_profile_key_matches(key)))
            conn.execute(profiles.insert().values(
                **_profile_key_values(key), model_json=json.dumps(model), num_samples=num_samples,
                fit_error=None if fit_error is None else json.dumps(fit_error),
                created_at=time.time()))

    def load_profile(self, key: ProfileKey) -> dict[str, Any] | None:
        """The profile stored under exactly `key` (every key column equal), or None."""
        rows = self._select_profiles(_profile_key_matches(key))
        return rows[0] if rows else None

    def list_profiles(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every stored profile (of one model), newest first."""
        return self._select_profiles(sa.true() if model is None else profiles.c.model == model)

    def _select_profiles(self, where) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(profiles).where(where)
                                .order_by(profiles.c.created_at.desc())).mappings().all()
        return [_profile_from_row(r) for r in rows]


def _profile_key_values(key: ProfileKey) -> dict[str, Any]:
    return {name: getattr(key, name) for name in PROFILE_KEY_COLUMNS}


def _profile_key_matches(key: ProfileKey):
    return sa.and_(*(profiles.c[name] == value for name, value in _profile_key_values(key).items()))


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
        id=r["id"], state=r["state"], spec=JobSpec.from_dict(json.loads(r["spec"])),
        num_total=r["num_total"], num_done=r["num_done"], created_at=r["created_at"],
        updated_at=r["updated_at"], run_s=r["run_s"], error=r["error"], run_key=r["run_key"],
    )


def _insert_ignore(table: sa.Table, conn: sa.Connection):
    dialect = conn.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise DatabaseURLError(f"unsupported database dialect {dialect!r}")
    return insert(table).on_conflict_do_nothing()


def _create_engine(url: str) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        raise DatabaseURLError(
            f"malformed database URL {url!r} (expected e.g. sqlite:///conserve.db)"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
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
