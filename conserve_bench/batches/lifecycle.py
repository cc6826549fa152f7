"""A batch's life: created from an uploaded file, run as a job, finalized into files.

`create_batch` checks the input file (a 400 naming the first bad line) and records the batch
with its job and one work item per line, in one transaction; the batch is `validating` until
a replica starts its job (`run_batch`, called by `jobs.lifecycle.run_job`), then
`in_progress`. The replica that finds every line done moves it to `finalizing` and writes the
output and error files (`finalize`); one that dies there leaves the job running, so the next
replica on it finalizes again, writing the same files. `settle` (the server's sweeper) ends
what no run ends: a batch whose window passed is `expired` (its finished lines delivered, the
rest reported `batch_expired`), a `cancelling` one `cancelled`. Every move is a
compare-and-set (`Store.move_batch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any

from conserve_bench.batches.lines import Line, parse_lines
from conserve_bench.batches.objects import (CANCELLABLE, CANCELLED, EXPIRED, RUNNING, batch_object,
                                            batch_usage, progress, request_id, response_line,
                                            unanswered_line, window_seconds)
from conserve_bench.config import JobSpec
from conserve_bench.errors import InvalidRequestError, JobStateError
from conserve_bench.store import Batch, BatchStatus, RequestCounts, Store, WorkItem

log = logging.getLogger(__name__)

ITEM_KIND = "openai"
BATCH_LABEL = "openai-batch"  # the job's task label (`jobs`, `status`)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits


def create_batch(store: Store, input_file_id: str, endpoint: str, completion_window: str,
                 model: str, fingerprint: str, metadata: dict[str, str] | None = None,
                 served_urls: tuple[str, ...] | None = None) -> Batch:
    """Record a batch over an uploaded `batch` file; nothing is written unless the file is
    a batch of `endpoint` (one this server serves: `served_urls`) and the window and
    metadata are valid."""
    window_s = window_seconds(completion_window)
    _check_metadata(metadata)
    if served_urls is not None and endpoint not in served_urls:
        raise InvalidRequestError(f"this server's model does not serve {endpoint}; it serves "
                                  f"{', '.join(served_urls)}")
    found = store.get_file(input_file_id)
    if found["purpose"] != "batch":
        raise InvalidRequestError(f"file {input_file_id!r} has purpose {found['purpose']!r}, not 'batch'")
    lines = parse_lines(store.file_content(input_file_id), endpoint)
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    work = [WorkItem(line_key(batch_id, line.index), ITEM_KIND,
                     {**line.args(), "batch_id": batch_id, "request_id": request_id(batch_id, line.index)})
            for line in lines]
    spec = JobSpec(tasks=(BATCH_LABEL,), model=model, source="batch", fingerprint=fingerprint)
    now = time.time()
    return store.create_batch(spec, work, dict(
        id=batch_id, endpoint=endpoint, input_file_id=input_file_id,
        completion_window=completion_window, num_lines=len(lines), line_errors="{}",
        metadata=json.dumps(metadata) if metadata else None, expires_at=now + window_s))


def line_key(batch_id: str, index: int) -> str:
    """A line's item key: its batch and place (two batches never share a line's result)."""
    return hashlib.sha256(f"{ITEM_KIND}:{batch_id}:{index}".encode()).hexdigest()


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY
            and len(v) <= MAX_METADATA_VALUE for k, v in metadata.items()):
        raise InvalidRequestError(f"metadata: at most {MAX_METADATA_PAIRS} string pairs, keys up "
                                  f"to {MAX_METADATA_KEY} and values up to {MAX_METADATA_VALUE} characters")


def describe(store: Store, batch: Batch, now: float | None = None) -> dict[str, Any]:
    """OpenAI's Batch object, with its rate and ETA under `conserve`."""
    counts = store.batch_request_counts(batch)
    model = store.job_spec(batch.job_id).model
    return batch_object(batch, counts, model, progress(counts, now or time.time(), batch))


def run_batch(store: Store, job, runner) -> dict[str, Any]:
    """Run a batch's job (its lines) on `runner`, then finalize the batch as completed; the
    job's results name the batch. Another replica may finalize it first: then this one only
    returns."""
    batch = store.batch_of_job(job.id)
    store.move_batch(batch.id, BatchStatus.IN_PROGRESS, only_from=[BatchStatus.VALIDATING])
    if store.get_batch(batch.id).status in RUNNING + (BatchStatus.FINALIZING,):
        keys = [line_key(batch.id, index) for index in range(batch.num_lines)]
        runner.run(job.id, keys)
        if not store.get_batch(batch.id).status.is_final:
            finalize(store, batch.id, BatchStatus.COMPLETED)
    batch = store.get_batch(batch.id)
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.EXPIRED):
        raise JobStateError(f"batch {batch.id} is {batch.status}")
    return {"results": {}, "batch": describe(store, batch)}


_FINALIZED_FROM = {
    BatchStatus.COMPLETED: (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING),
    BatchStatus.EXPIRED: (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS),  # a finalizing one completes
    BatchStatus.CANCELLED: (BatchStatus.CANCELLING,),
}


def finalize(store: Store, batch_id: str, status: BatchStatus) -> bool:
    """Write the batch's output and error files and end it in `status` (completed, expired
    or cancelled); False if it had moved on (another replica finalized it, or it was
    cancelled meanwhile). Lines not done are reported expired or cancelled; the answered
    lines' token totals become the batch's `usage`."""
    allowed = _FINALIZED_FROM[status]
    if status == BatchStatus.COMPLETED and not store.move_batch(
            batch_id, BatchStatus.FINALIZING, only_from=allowed):
        return False
    batch = store.get_batch(batch_id)
    if batch.status not in allowed:
        return False
    outputs, errors, counts = _file_lines(store, batch, status)
    values: dict[str, Any] = {"usage": batch_usage(line["response"]["body"] for line in outputs),
                              "request_counts": counts.to_dict()}
    for name, lines in (("output", outputs), ("error", errors)):
        if lines:
            content = "".join(json.dumps(line) + "\n" for line in lines).encode()
            values[f"{name}_file_id"] = store.create_file(
                f"batch_{name}", f"{batch.id}_{name}.jsonl", content, file_id=f"file-{batch.id}-{name}")["id"]
    only_from = [BatchStatus.FINALIZING] if status == BatchStatus.COMPLETED else allowed
    return store.move_batch(batch.id, status, only_from=only_from, **values)


def _file_lines(store: Store, batch: Batch, status: BatchStatus) -> tuple[list, list, RequestCounts]:
    """The output lines (answered 200) and error lines (refused, or never run), in input
    order, and the request counts they make (`Store.batch_request_counts`' for a batch
    still running: a line never run is in neither count)."""
    unanswered = {BatchStatus.EXPIRED: EXPIRED, BatchStatus.CANCELLED: CANCELLED}.get(status)
    outputs, errors, num_refused = [], [], 0
    for item in store.job_items(batch.job_id, with_args=True):
        line = Line.from_args(item["args"])
        if line.index in batch.line_errors:
            errors.append(batch.line_errors[line.index])
        elif item["result"] is not None:
            result = item["result"]
            target = outputs if result["status_code"] == 200 else errors
            target.append(response_line(batch.id, line, result["status_code"], result["body"]))
            num_refused += result["status_code"] != 200
        elif unanswered is not None:
            errors.append(unanswered_line(batch.id, line, *unanswered))
    counts = RequestCounts(total=batch.num_lines, completed=len(outputs),
                           failed=num_refused + len(batch.line_errors))
    return outputs, errors, counts


def cancel_batch(store: Store, batch_id: str) -> Batch:
    """Move a validating or in-progress batch to `cancelling` and cancel its job; its
    replicas stop at their next check, and `settle` finalizes it as cancelled. A batch that
    has ended (or is finalizing) is a JobStateError."""
    if not store.move_batch(batch_id, BatchStatus.CANCELLING, only_from=CANCELLABLE):
        batch = store.get_batch(batch_id)
        if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return batch  # NOTE: as OpenAI: cancelling twice answers the batch
        raise JobStateError(f"batch {batch_id} is {batch.status}; it cannot be cancelled")
    store.cancel_job(store.get_batch(batch_id).job_id)
    return store.get_batch(batch_id)


def settle(store: Store, now: float | None = None) -> list[str]:
    """End the batches no run ends: past their window (expired, their job cancelled) or
    cancelling (cancelled). Safe on every replica at once; returns the ids it ended."""
    now = time.time() if now is None else now
    ended = []
    for batch in store.list_batches(limit=None, statuses=(*RUNNING, BatchStatus.CANCELLING)):
        if batch.status == BatchStatus.CANCELLING:
            status = BatchStatus.CANCELLED
        elif batch.expires_at <= now:
            store.cancel_job(batch.job_id)
            status = BatchStatus.EXPIRED
        else:
            continue
        if finalize(store, batch.id, status):
            log.warning("batch %s %s", batch.id, status)
            ended.append(batch.id)
    return ended
