"""The job API on the serving app: `/v1/jobs` to submit, list, inspect, fetch, cancel.

Handlers parse, call the same `jobs` functions as the CLI, and return the same JSON
objects as the CLI's `--json`. A malformed spec is a 422 naming the field, an unknown task a
400; neither writes anything. The offline pump (not this module) runs the jobs.
`POST /v1/jobs/requests` queues lm-eval requests built elsewhere (`--model conserve` in client
mode), keyed with this server's fingerprint; `GET /v1/jobs/{id}/items` pages their results.
A `run_key` on `POST /v1/jobs` names the job: posting it again answers the same job (200),
queued again if it had failed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from conserve_bench.jobs import lifecycle
from conserve_bench.config import JobSpec
from conserve_bench.errors import ConserveError, JobNotFoundError, JobStateError
from conserve_bench.engine.prompts import check_request_args
from conserve_bench.store import JobState

MAX_REQUESTS_PER_JOB = 10_000
MAX_ITEMS_PER_PAGE = 5_000


class JobRequest(BaseModel):
    model_config = {"extra": "forbid"}

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    gen_kwargs: dict[str, Any] = Field(default_factory=dict)
    data_dir: str | None = None
    samples: dict[str, list[int]] | None = None
    run_key: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, value):
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _valid_spec(self):
        self.spec(model="", data_dir=None)  # JobSpec's own checks; ValueError -> 422
        return self

    def spec(self, model: str, data_dir: str | None) -> JobSpec:
        return JobSpec(tasks=tuple(self.tasks), model=model, limit=self.limit,
                       num_fewshot=self.num_fewshot, gen_kwargs=self.gen_kwargs,
                       data_dir=self.data_dir or data_dir, samples=self.samples)


class WorkRequest(BaseModel):
    """One lm-eval request as `Instance.args`: [context, continuation], [text] or
    [context, gen_kwargs]."""

    model_config = {"extra": "forbid"}

    kind: str
    args: list[Any]

    @model_validator(mode="after")
    def _shape(self):
        check_request_args(self.kind, self.args)  # ValueError -> 422 naming the request
        return self


class RequestsJobRequest(BaseModel):
    """A job over requests an lm-eval run elsewhere built (`--model conserve` in client mode)."""

    model_config = {"extra": "forbid"}

    requests: list[WorkRequest] = Field(min_length=1, max_length=MAX_REQUESTS_PER_JOB)
    label: str = Field(default="lm-eval", min_length=1, max_length=64)


def install_job_api(app, store, cfg, fingerprint: str) -> None:
    """Add `/v1/jobs` to `app`; `fingerprint` keys requests jobs' items (the engine's)."""
    from fastapi import APIRouter, Query
    from fastapi.responses import JSONResponse

    router = APIRouter(prefix="/v1/jobs", route_class=_route_class())

    @router.post("", status_code=201)
    def create(request: JobRequest):
        spec = request.spec(cfg.model, cfg.data_dir)
        if request.run_key and (known := store.job_by_run_key(request.run_key)) and known.spec == spec:
            if known.state == JobState.FAILED:  # asked for again: the pump retries it, as `ci` would
                store.set_job_state(known.id, JobState.QUEUED)
            return JSONResponse(store.get_job(known.id).to_dict(), status_code=200)  # re-attached
        return lifecycle.submit_job(store, spec, request.run_key).to_dict()

    @router.post("/requests", status_code=201)
    def create_from_requests(request: RequestsJobRequest) -> dict[str, Any]:
        work = [(r.kind, r.args) for r in request.requests]
        job, keys = lifecycle.submit_requests(store, work, fingerprint, cfg.model, request.label)
        return {**job.to_dict(), "keys": keys}

    @router.get("")
    def list_all(limit: int = Query(lifecycle.JOBS_LISTED, ge=0)) -> dict[str, Any]:
        """The newest `limit` jobs (0: all), `num_jobs` in the store, the live replicas."""
        return lifecycle.fleet_overview(store, limit)

    @router.get("/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        return lifecycle.job_status(store, job_id)

    @router.get("/{job_id}/results")
    def results(job_id: str, full: bool = False) -> dict[str, Any]:
        """Task -> metric -> value; `?full=true`: everything stored (lm-eval's layout, the job's
        metadata, the per-document table)."""
        found = lifecycle.job_results(store, job_id)
        return found if full else lifecycle.results_summary(found)

    @router.get("/{job_id}/items")
    def items(job_id: str, offset: int = Query(0, ge=0),
              limit: int = Query(1000, ge=1, le=MAX_ITEMS_PER_PAGE)) -> dict[str, Any]:
        store.get_job(job_id)
        page = store.job_items(job_id, offset, limit)
        return {"items": page, "next_offset": offset + limit if len(page) == limit else None}

    @router.post("/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        return lifecycle.cancel_job(store, job_id).to_dict()

    app.include_router(router)


def _error_status(exc: ConserveError) -> int:
    if isinstance(exc, JobNotFoundError):
        return 404
    return 409 if isinstance(exc, JobStateError) else 400


def _route_class():
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    class ErrorsAsJSON(APIRoute):
        """Answers a ConserveError with its status and one-line message (app-level handlers
        cannot be added: vLLM's app has built its middleware stack already)."""

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def guarded(request):
                try:
                    return await handler(request)
                except ConserveError as exc:
                    body = {"error": {"message": str(exc), "type": type(exc).__name__}}
                    return JSONResponse(body, status_code=_error_status(exc))
                except RequestValidationError as exc:  # vLLM's app would turn it into a 400
                    return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

            return guarded

    return ErrorsAsJSON
