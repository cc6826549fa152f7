"""OpenAI's Files and Batch APIs on the serving app: `/v1/files`, `/v1/batches`.

Wire-compatible with OpenAI's, so its SDKs work unchanged against `serve`
(`client.files.create(file=..., purpose="batch")`, `client.batches.create(...)`,
`client.batches.retrieve(...)`, `client.files.content(...)`): the same objects, list pages
(`data`, `has_more`, `first_id`, `last_id`, `after`/`limit`), and error bodies
(`{"error": {"message", "type", "param", "code"}}`). Uploads are capped
(`serve --max-batch-file-bytes`, the guard enforcing it before the body is read) and kept in
the store, so every replica of a fleet and a restarted server see them. A batch runs as a job
of the offline pump (`batches.lifecycle`), behind online traffic. Error messages never name a
store URL or a server path: their errors name neither (files live in the store), and a store
outage is one fixed line.
"""

# NOTE: no `from __future__ import annotations`: FastAPI resolves the routes' annotations
# (UploadFile, imported where the routes are built) when they are declared.

import logging
from typing import Any

from pydantic import BaseModel, Field

from conserve_bench.batches import lifecycle
from conserve_bench.batches.lines import BatchFileError
from conserve_bench.batches.objects import DEFAULT_COMPLETION_WINDOW, error_body, file_object
from conserve_bench.errors import (ConserveError, EngineUnavailableError, JobNotFoundError,
                                   JobStateError, StoreUnavailableError, first_line)
from conserve_bench.serve.jobapi import PollCache, errors_route_class

log = logging.getLogger(__name__)

FILES_PATH, BATCHES_PATH = "/v1/files", "/v1/batches"
FILE_PURPOSES = ("batch",)  # what clients upload here; outputs are "batch_output"
MAX_LIST_LIMIT = 10_000


class BatchRequest(BaseModel):
    model_config = {"extra": "ignore"}  # NOTE: newer clients send fields this server does not use

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(min_length=1, max_length=64)
    completion_window: str = Field(default=DEFAULT_COMPLETION_WINDOW, max_length=16)
    metadata: dict[str, str] | None = None


class BatchAnswers:
    """Batch objects as the routes and the sweeper answer them: a batch still running counts
    its lines (its done items' results), so its answer is reused while its status holds and it
    is young against that cost (`jobapi.PollCache`), whoever asks; a finalized batch's counts
    are kept in its row, and its answer is read afresh (and not kept)."""

    def __init__(self, store, polls: PollCache | None = None):
        self.store, self.polls = store, polls or PollCache()

    def describe(self, batch) -> dict[str, Any]:
        if batch.status.is_final:
            self.polls.forget(batch.id)
            return lifecycle.describe(self.store, batch)
        return self.polls.answer(batch.id, batch.status.value, lambda: lifecycle.describe(self.store, batch))


def install_batch_api(app, store, model: str, fingerprint: str, served_urls: tuple[str, ...],
                      answers: BatchAnswers | None = None) -> None:
    """Add `/v1/files` and `/v1/batches` to `app`; batches of `served_urls` (the endpoints
    the model serves) are keyed with the engine's `fingerprint`; `answers`: shared with the
    server's `BatchSweeper`."""
    from fastapi import APIRouter, File, Form, Query, UploadFile
    from fastapi.responses import Response

    files = APIRouter(prefix=FILES_PATH, route_class=_route_class())
    batches = APIRouter(prefix=BATCHES_PATH, route_class=_route_class())
    answers = answers or BatchAnswers(store)

    @files.post("")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict[str, Any]:
        if purpose not in FILE_PURPOSES:
            raise _BadParam(f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}", "purpose")
        content = await file.read()
        row = store.create_file(purpose, (file.filename or "upload.jsonl")[:256], content)
        return file_object(row["id"], row["purpose"], row["filename"], row["num_bytes"], row["created_at"])

    @files.get("")
    def list_files(purpose: str | None = None, limit: int = Query(10_000, ge=1, le=MAX_LIST_LIMIT),
                   after: str | None = None) -> dict[str, Any]:
        rows = store.list_files(purpose, limit + 1, after)
        return _page([_file(r) for r in rows[:limit]], has_more=len(rows) > limit)

    @files.get("/{file_id}")
    def retrieve_file(file_id: str) -> dict[str, Any]:
        return _file(store.get_file(file_id))

    @files.get("/{file_id}/content")
    def file_content(file_id: str):
        return Response(store.file_content(file_id), media_type="application/octet-stream")

    @files.delete("/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @batches.post("")
    def create(request: BatchRequest) -> dict[str, Any]:
        batch = lifecycle.create_batch(store, request.input_file_id, request.endpoint,
                                       request.completion_window, model, fingerprint,
                                       request.metadata, served_urls)
        return lifecycle.describe(store, batch)

    @batches.get("")
    def list_batches(limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict[str, Any]:
        found = store.list_batches(limit + 1, after)
        return _page([answers.describe(b) for b in found[:limit]], has_more=len(found) > limit)

    @batches.get("/{batch_id}")
    def retrieve(batch_id: str) -> dict[str, Any]:
        return answers.describe(store.get_batch(batch_id))  # NOTE: its status is always read afresh

    @batches.post("/{batch_id}/cancel")
    def cancel(batch_id: str) -> dict[str, Any]:
        return lifecycle.describe(store, lifecycle.cancel_batch(store, batch_id))

    app.include_router(files)
    app.include_router(batches)


def _file(row: dict[str, Any]) -> dict[str, Any]:
    return file_object(row["id"], row["purpose"], row["filename"], row["num_bytes"], row["created_at"])


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page (the SDKs page on with `after=last_id`)."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


class _BadParam(ConserveError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _status(exc: ConserveError) -> int:
    if isinstance(exc, (StoreUnavailableError, EngineUnavailableError)):
        return 503
    if isinstance(exc, JobNotFoundError):
        return 404
    return 409 if isinstance(exc, JobStateError) else 400


def _openai_error(exc: ConserveError) -> dict[str, Any]:
    status = _status(exc)
    kind = {404: "not_found_error", 409: "invalid_request_error", 503: "server_error"}.get(
        status, "invalid_request_error")
    param = getattr(exc, "param", None)
    code = None
    if isinstance(exc, BatchFileError):
        code, param = "invalid_batch_file", param
    message = first_line(exc)
    if isinstance(exc, StoreUnavailableError):
        message = "the store is unreachable for now; nothing was lost, try again later"
    body = error_body(message, kind, param, code)
    if isinstance(exc, BatchFileError) and exc.line is not None:
        body["error"]["line"] = exc.line
    return body


def _route_class():
    """OpenAI's errors: a ConserveError with its status, a malformed body a 400, both in
    OpenAI's error shape."""
    from fastapi.responses import JSONResponse

    def validation_error(exc) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param}: {first.get('msg')}", param=param), status_code=400)

    return errors_route_class(
        lambda exc, request: JSONResponse(_openai_error(exc), status_code=_status(exc)), validation_error)


SWEEP_S = 1.0  # how often the server ends expired and cancelled batches
EXPORTED_BATCHES = 100  # the newest batches whose progress /metrics shows


class BatchSweeper:
    """On the server's loop: ends the batches no run ends (`lifecycle.settle`: expired,
    cancelled) and exports the newest batches' progress to `/metrics`, answered as the
    routes answer them (`BatchAnswers`: a running batch's lines are not counted every
    second). A store outage skips a sweep; the next one catches up."""

    def __init__(self, store, answers: BatchAnswers | None = None, poll_s: float = SWEEP_S):
        self.store, self.poll_s = store, poll_s
        self.answers = answers or BatchAnswers(store)

    async def run(self) -> None:
        import asyncio

        while True:
            await asyncio.get_running_loop().run_in_executor(None, self.sweep)
            await asyncio.sleep(self.poll_s)

    def sweep(self) -> None:
        from conserve_bench.serve.metrics import batch_progress

        try:
            lifecycle.settle(self.store)
            for batch in self.store.list_batches(EXPORTED_BATCHES):
                obj = self.answers.describe(batch)
                batch_progress(batch.id, obj["request_counts"], obj["conserve"]["eta_s"])
        except StoreUnavailableError as e:
            log.warning("batch sweep skipped: %s", first_line(e))
