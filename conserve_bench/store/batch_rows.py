"""The OpenAI Batch API's rows: files (content in the row) and batches, each batch the job
whose items are its lines. A batch is created with its job and items in one transaction, and
its status moves by compare-and-set, so two replicas (or a cancel and a finishing run) never
undo each other."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from conserve_bench.config import JobSpec
from conserve_bench.errors import BatchNotFoundError, FileNotFoundInStoreError
from conserve_bench.store.base import StoreBase
from conserve_bench.store.db import insert_ignore
from conserve_bench.store.schema import batches, files, items, job_items, jobs
from conserve_bench.store.states import STAMPED_BATCH_STATUSES as STAMPED, BatchStatus, ItemState, JobState

# NOTE: an "openai" item's result JSON begins with its status code (`batches.lifecycle`
# writes it first), so the requests an endpoint refused are counted without parsing results.
ANSWERED_OK = '{"status_code": 200,%'


@dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int  # answered 200
    failed: int  # refused by the endpoint, or at validation

    @property
    def num_finished(self) -> int:
        return self.completed + self.failed

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed}


@dataclass(frozen=True)
class Batch:
    """A batch row (times: seconds since the epoch); `batches.objects.batch_object` is what
    OpenAI's clients read of it."""

    id: str
    job_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    num_lines: int
    line_errors: Mapping[int, dict[str, Any]]  # refused before they ran: index -> error line
    created_at: float
    expires_at: float
    stamps: Mapping[str, float | None]  # status -> when the batch entered it
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict[str, Any] | None = None  # the answered lines' token totals, once finalized
    request_counts: RequestCounts | None = None  # what its files hold, once finalized


class BatchRows(StoreBase):
    # -- files --------------------------------------------------------------------------------

    def create_file(self, purpose: str, filename: str, content: bytes,
                    file_id: str | None = None) -> dict[str, Any]:
        """Store a file; a given `file_id` that exists already is replaced (a batch's output,
        written again by a replica finalizing it again)."""
        row = dict(id=file_id or f"file-{uuid.uuid4().hex[:24]}", purpose=purpose,
                   filename=filename, num_bytes=len(content), content=content,
                   created_at=time.time())

        def write(conn: sa.Connection) -> None:
            conn.execute(files.delete().where(files.c.id == row["id"]))
            conn.execute(files.insert().values(**row))

        self._write(write)
        return {k: v for k, v in row.items() if k != "content"}

    def get_file(self, file_id: str) -> dict[str, Any]:
        columns = [c for c in files.c if c.name != "content"]
        row = self._read(lambda conn: conn.execute(
            sa.select(*columns).where(files.c.id == file_id)).mappings().first())
        if row is None:
            raise FileNotFoundInStoreError(f"no file {file_id!r}")
        return dict(row)

    def file_content(self, file_id: str) -> bytes:
        content = self._read(lambda conn: conn.execute(
            sa.select(files.c.content).where(files.c.id == file_id)).scalar())
        if content is None:
            raise FileNotFoundInStoreError(f"no file {file_id!r}")
        return bytes(content)

    def list_files(self, purpose: str | None = None, limit: int = 10000,
                   after: str | None = None) -> list[dict[str, Any]]:
        """Newest first; `after`: the files older than that one."""
        columns = [c for c in files.c if c.name != "content"]
        query = sa.select(*columns)
        if purpose:
            query = query.where(files.c.purpose == purpose)
        if after:
            query = query.where(files.c.created_at < sa.select(files.c.created_at)
                                .where(files.c.id == after).scalar_subquery())
        rows = self._read(lambda conn: conn.execute(
            query.order_by(files.c.created_at.desc(), files.c.id).limit(limit)).mappings().all())
        return [dict(r) for r in rows]

    def delete_file(self, file_id: str) -> None:
        if not self._write(lambda conn: conn.execute(
                files.delete().where(files.c.id == file_id)).rowcount):
            raise FileNotFoundInStoreError(f"no file {file_id!r}")

    # -- batches ------------------------------------------------------------------------------

    def create_batch(self, spec: JobSpec, work: Sequence, row: Mapping[str, Any]) -> Batch:
        """Record a batch (`row`: its columns but the job's) with its job, queued, and the
        job's items, in one transaction: a replica never sees a batch's job without its items
        or its batch."""
        now = time.time()
        job_id = uuid.uuid4().hex[:12]

        def create(conn: sa.Connection) -> None:
            conn.execute(jobs.insert().values(
                id=job_id, state=JobState.QUEUED, spec=json.dumps(spec.to_dict()), num_total=0,
                created_at=now, updated_at=now, run_s=0.0))
            if work:
                self._attach_items(conn, job_id, work)
            conn.execute(insert_ignore(batches, conn).values(
                **row, job_id=job_id, created_at=now, status=BatchStatus.VALIDATING))

        self._write(create)
        return self.get_batch(row["id"])

    def get_batch(self, batch_id: str) -> Batch:
        found = self._select_batches(batches.c.id == batch_id)
        if not found:
            raise BatchNotFoundError(f"no batch {batch_id!r}")
        return found[0]

    def batch_of_job(self, job_id: str) -> Batch:
        found = self._select_batches(batches.c.job_id == job_id)
        if not found:
            raise BatchNotFoundError(f"job {job_id} has no batch")
        return found[0]

    def list_batches(self, limit: int = 20, after: str | None = None,
                     statuses: Iterable[BatchStatus] | None = None) -> list[Batch]:
        """Newest first; `after`: the batches older than that one."""
        where = []
        if after:
            where.append(batches.c.created_at < sa.select(batches.c.created_at)
                         .where(batches.c.id == after).scalar_subquery())
        if statuses is not None:
            where.append(batches.c.status.in_([BatchStatus(s) for s in statuses]))
        return self._select_batches(*where, limit=limit)

    def _select_batches(self, *where, limit: int | None = None) -> list[Batch]:
        query = sa.select(batches).where(*where).order_by(batches.c.created_at.desc(), batches.c.id)
        rows = self._read(lambda conn: conn.execute(query.limit(limit)).mappings().all())
        return [_batch_from_row(r) for r in rows]

    def move_batch(self, batch_id: str, to: BatchStatus, only_from: Iterable[BatchStatus],
                   **values: Any) -> bool:
        """Put the batch in `to` if it is in one of `only_from` now (one conditional UPDATE),
        stamping when (`<to>_at`) and writing `values` (output file ids, errors, usage,
        request counts) with it."""
        to = BatchStatus(to)
        for name in ("errors", "usage", "request_counts"):
            if values.get(name) is not None:
                values[name] = json.dumps(values[name])
        stamp = {f"{to.value}_at": time.time()} if to.value in STAMPED else {}
        return self._write(lambda conn: conn.execute(
            batches.update().where(batches.c.id == batch_id,
                                   batches.c.status.in_([BatchStatus(s) for s in only_from]))
            .values(status=to, **stamp, **values)).rowcount == 1)

    def batch_request_counts(self, batch: Batch) -> RequestCounts:
        """Its lines answered 200, and those refused (by the endpoint, or at validation):
        those its files hold once it is finalized, else counted from its done items (their
        results' first bytes)."""
        if batch.request_counts is not None:
            return batch.request_counts
        done = sa.and_(items.c.state == ItemState.DONE)
        ok = sa.func.sum(sa.case((items.c.result.like(ANSWERED_OK), 1), else_=0))
        row = self._read(lambda conn: conn.execute(
            sa.select(sa.func.count(), ok).select_from(items)
            .join(job_items, job_items.c.item_key == items.c.key)
            .where(job_items.c.job_id == batch.job_id, done)).one())
        num_done, num_ok = row[0], row[1] or 0
        return RequestCounts(total=batch.num_lines, completed=num_ok,
                             failed=num_done - num_ok + len(batch.line_errors))


def _batch_from_row(r) -> Batch:
    return Batch(
        id=r["id"], job_id=r["job_id"], endpoint=r["endpoint"], input_file_id=r["input_file_id"],
        completion_window=r["completion_window"], status=BatchStatus(r["status"]),
        num_lines=r["num_lines"],
        line_errors={int(k): v for k, v in json.loads(r["line_errors"]).items()},
        created_at=r["created_at"], expires_at=r["expires_at"],
        stamps={stamp: r[f"{stamp}_at"] for stamp in STAMPED},
        metadata=json.loads(r["metadata"]) if r["metadata"] else None,
        errors=json.loads(r["errors"]) if r["errors"] else None,
        output_file_id=r["output_file_id"], error_file_id=r["error_file_id"],
        usage=json.loads(r["usage"]) if r["usage"] else None,
        request_counts=RequestCounts(**json.loads(r["request_counts"])) if r["request_counts"] else None)
