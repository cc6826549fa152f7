"""The job API on the serving app: `/v1/jobs` to submit, list, inspect, fetch, cancel.

Handlers parse, call the same `jobs` functions as the CLI, and return the same JSON objects as
the CLI's `--json`. What a client sends is bounded and never a server path or code: tasks are
names of the server's task index (a path or a pattern is a 400), a `data_dir` lies under the
folders the server offers (`serve --data-root`), sizes and generation arguments are capped (a
422 naming the field). Nothing is written before all of it is checked, and an error body is
one line with no store URL or server path (a store outage: 503). The offline pump runs jobs.
`POST /v1/jobs/requests` queues lm-eval requests built elsewhere (`--model conserve` in client
mode), keyed with this server's fingerprint; `GET /v1/jobs/{id}/items` pages their results.
Such a client reads what the engine runs (`GET /v1/jobs/model`) and the served model's chat
templates (`GET /v1/jobs/chat-templates`), which it renders contexts with as embedded runs do.
A `run_key` on `POST /v1/jobs` names the job: posting it again answers the same job (200),
its failed items given fresh attempts (and queued again if it had failed).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from conserve_bench.config import JobSpec, fingerprint_numerics
from conserve_bench.engine.prompts import check_request_args
from conserve_bench.errors import (ConserveError, EngineUnavailableError, GenKwargsError,
                                   JobNotFoundError, JobStateError, StoreUnavailableError,
                                   first_line)
from conserve_bench.jobs import lifecycle
from conserve_bench.jobs.genkwargs import check_gen_kwargs
from conserve_bench.jobs.results import lm_eval_results
from conserve_bench.jobs.taskspec import check_tasks, offered_data_dir, task_manager
from conserve_bench.store import Job, JobState

MAX_REQUESTS_PER_JOB = 10_000
MAX_ITEMS_PER_PAGE = 5_000
MAX_TASKS_PER_JOB = 64  # tasks (or groups) of one job, and tasks with fixed `samples`
MAX_NAME_CHARS = 200  # a task name (lm-eval's longest: 86) or a run key
MAX_LABEL_CHARS = 64
MAX_LIMIT = 1_000_000  # documents per task
MAX_NUM_FEWSHOT = 64  # beyond any lm-eval task's few-shot split; the context cuts it anyway
MAX_SAMPLES = 100_000  # doc indices in `samples`, over all its tasks
MAX_DOC_INDEX = 2**31 - 1
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_SYSTEM_INSTRUCTION_CHARS = 100_000  # a system prompt, not a document
SHA256_HEX = r"^[0-9a-f]{64}$"
POLL_SHARE = 0.02  # `PollCache`: the most of the server's time one subject's status polls take

TaskName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
DocIndices = Annotated[list[Annotated[int, Field(ge=0, le=MAX_DOC_INDEX)]],
                       Field(min_length=1, max_length=MAX_SAMPLES)]


class JobRequest(BaseModel):
    model_config = {"extra": "forbid"}

    tasks: list[TaskName] = Field(min_length=1, max_length=MAX_TASKS_PER_JOB)
    limit: int | None = Field(default=None, ge=1, le=MAX_LIMIT)
    num_fewshot: int | None = Field(default=None, ge=0, le=MAX_NUM_FEWSHOT)
    gen_kwargs: dict[str, Any] = Field(default_factory=dict)
    data_dir: str | None = Field(default=None, min_length=1, max_length=MAX_PATH_CHARS)
    samples: dict[TaskName, DocIndices] | None = Field(default=None, max_length=MAX_TASKS_PER_JOB)
    run_key: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)
    # lm-eval's chat options (`JobSpec`): a template name, or true for the tokenizer's own
    apply_chat_template: bool | Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)] = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = Field(default=None, min_length=1,
                                           max_length=MAX_SYSTEM_INSTRUCTION_CHARS)

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, value):
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @field_validator("gen_kwargs")
    @classmethod
    def _known_gen_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_gen_kwargs(value)  # GenKwargsError is a ValueError -> 422
        return value

    @field_validator("samples")
    @classmethod
    def _bounded_samples(cls, value: dict[str, list[int]] | None):
        if value and sum(map(len, value.values())) > MAX_SAMPLES:
            raise ValueError(f"at most {MAX_SAMPLES} doc indices in all")
        return value

    @model_validator(mode="after")
    def _valid_spec(self):
        self.spec(model="", data_dir=None)  # JobSpec's own checks; ValueError -> 422
        return self

    def spec(self, model: str, data_dir: str | None) -> JobSpec:
        return JobSpec(tasks=tuple(self.tasks), model=model, limit=self.limit,
                       num_fewshot=self.num_fewshot, gen_kwargs=self.gen_kwargs,
                       data_dir=data_dir, samples=self.samples,
                       apply_chat_template=self.apply_chat_template,
                       fewshot_as_multiturn=self.fewshot_as_multiturn,
                       system_instruction=self.system_instruction)


class WorkRequest(BaseModel):
    """One lm-eval request as `Instance.args`: [context, continuation], [text] or
    [context, gen_kwargs]."""

    model_config = {"extra": "forbid"}

    kind: str
    args: list[Any]

    @model_validator(mode="after")
    def _shape(self):
        check_request_args(self.kind, self.args)  # ValueError -> 422 naming the request
        if self.kind == "generate_until":
            # NOTE: lm-eval built these from a task's YAML, whose generation_kwargs may name
            # another backend's arguments: the engine ignores those, but checks its own.
            check_gen_kwargs(self.args[1], unknown_ok=True)
        return self


class RequestsJobRequest(BaseModel):
    """A job over requests an lm-eval run elsewhere built (`--model conserve` in client mode)."""

    model_config = {"extra": "forbid"}

    requests: list[WorkRequest] = Field(min_length=1, max_length=MAX_REQUESTS_PER_JOB)
    label: str = Field(default="lm-eval", min_length=1, max_length=MAX_LABEL_CHARS)
    chat_template_sha256: str | None = Field(default=None, pattern=SHA256_HEX)  # what rendered them


def install_job_api(app, store, cfg, fingerprint: str, max_model_len: int | None = None) -> None:
    """Add `/v1/jobs` to `app`; `fingerprint` keys requests jobs' items (the engine's), and
    `max_model_len` (its context length; None: unknown) bounds the tokens a job generates."""
    from fastapi import APIRouter, Query
    from fastapi.responses import JSONResponse

    router = APIRouter(prefix="/v1/jobs", route_class=_route_class())
    polls = PollCache()

    @router.post("", status_code=201)
    def create(request: JobRequest):
        spec = _checked_spec(request, cfg, max_model_len)
        if request.run_key and (known := store.job_by_run_key(request.run_key)) and known.spec == spec:
            return JSONResponse(_ask_again(store, known).to_dict(), status_code=200)  # re-attached
        return lifecycle.submit_job(store, spec, request.run_key, allow_paths=False,
                                    include_paths=cfg.include_paths).to_dict()

    @router.post("/requests", status_code=201)
    def create_from_requests(request: RequestsJobRequest) -> dict[str, Any]:
        work = [(r.kind, r.args) for r in request.requests]
        job, keys = lifecycle.submit_requests(store, work, fingerprint, cfg.model, request.label,
                                              request.chat_template_sha256)
        return {**job.to_dict(), "keys": keys}

    # NOTE: before `/{job_id}`, which would take these names for job ids.
    @router.get("/model")
    def served_model() -> dict[str, Any]:
        """What the engine runs, for a client-mode lm-eval run to check its model_args against."""
        return _served_model(cfg.model, fingerprint, max_model_len)

    @router.get("/chat-templates")
    def chat_templates() -> dict[str, Any]:
        """The served model's chat templates and special tokens (`engine.chat.ChatTemplates`)."""
        return _chat_templates(cfg.model).to_dict()

    @router.get("")
    def list_all(limit: int = Query(lifecycle.JOBS_LISTED, ge=0)) -> dict[str, Any]:
        """The newest `limit` jobs (0: all), `num_jobs` in the store, the live replicas."""
        return lifecycle.fleet_overview(store, limit)

    @router.get("/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        state = store.get_job_state(job_id).value  # NOTE: a 404 before anything is counted
        return polls.answer(job_id, state, lambda: lifecycle.job_status(store, job_id))

    @router.get("/{job_id}/results")
    def results(job_id: str, full: bool = False) -> dict[str, Any]:
        """lm-eval's results object, as in the job's results file and `results --json` (the
        job's metadata under `conserve`); `?full=true` adds the per-document table."""
        found = lifecycle.job_results(store, job_id)
        return found if full else lm_eval_results(found)

    @router.get("/{job_id}/items")
    def items(job_id: str, offset: int = Query(0, ge=0),
              limit: int = Query(1000, ge=1, le=MAX_ITEMS_PER_PAGE)) -> dict[str, Any]:
        store.get_job_state(job_id)  # NOTE: a 404 for an unknown job, without counting its items
        page = store.job_items(job_id, offset, limit)
        return {"items": page, "next_offset": offset + limit if len(page) == limit else None}

    @router.post("/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        return lifecycle.cancel_job(store, job_id).to_dict()

    app.include_router(router)


class PollCache:
    """Answers to status polls (`GET /v1/jobs/{id}`, `GET /v1/batches/{id}`), each reused
    while its subject's state is unchanged and it is younger than `1 / POLL_SHARE` times what
    computing it took.

    An answer counts the job's items on the server's CPU, which on a CPU-only host the
    engine's steps run on: 66 ms for all of MMLU on 2 cores, and a client polling that every
    second made online decode steps 1.4x slower at P90. Reused this way, polls of one subject
    take at most `POLL_SHARE` of the server's time, however many clients ask how often; the
    caller reads the state (a job's, a batch's status) afresh for every answer.
    """

    def __init__(self, share: float = POLL_SHARE, clock: Callable[[], float] = time.monotonic):
        self.share, self.clock = share, clock
        self._answers: dict[str, tuple[float, float, str, dict[str, Any]]] = {}  # at, kept for s, state

    def answer(self, key: str, state: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        now = self.clock()
        computed_at, keep_s, known_state, answer = self._answers.get(key, (0.0, 0.0, "", {}))
        if answer and known_state == state and now - computed_at < keep_s:
            return answer
        answer = compute()
        self._answers[key] = (now, (self.clock() - now) / self.share, state, answer)
        return answer

    def __contains__(self, key: str) -> bool:
        return key in self._answers

    def forget(self, key: str) -> None:
        """Drop `key`'s answer (its subject settled: nothing left to reuse)."""
        self._answers.pop(key, None)


def _checked_spec(request: JobRequest, cfg, max_model_len: int | None) -> JobSpec:
    """The job a request asks for, checked against this server: its context length, the data
    folders it offers, its task index. Its data folder is stored resolved, its tasks as
    names.

    NOTE: the tasks are checked before a run key re-attaches, so no request, new or repeated,
    gets past this with a path.
    """
    _check_within_context(request.gen_kwargs, max_model_len)
    data_dir = cfg.data_dir
    if request.data_dir is not None:
        data_dir = offered_data_dir(request.data_dir, cfg.client_data_roots)
    spec = request.spec(cfg.model, data_dir)
    check_tasks(spec.tasks, task_manager(spec.data_dir, cfg.include_paths), allow_paths=False)
    return spec


def _served_model(model: str, fingerprint: str, max_model_len: int | None) -> dict[str, Any]:
    """The engine's model, dtype, context length and BOS prefix, as its fingerprint names them
    (read where it is written: `config.fingerprint_numerics`)."""
    from conserve_bench.engine.models import model_name

    return {"model": model_name(model), **fingerprint_numerics(fingerprint),
            "max_model_len": max_model_len, "fingerprint": fingerprint}


def _chat_templates(model: str):
    """The chat templates of the model the server serves (its tokenizer, read once)."""
    from conserve_bench.engine.chat import load_chat_templates
    from conserve_bench.engine.models import resolve_model

    ref = resolve_model(model)
    return load_chat_templates(ref.path, ref.name)


def _check_within_context(gen_kwargs: dict[str, Any], max_model_len: int | None) -> None:
    """A 422 on `gen_kwargs`, as the request's own checks give, if it generates past the
    engine's context length."""
    from fastapi.exceptions import RequestValidationError

    try:
        check_gen_kwargs(gen_kwargs, max_model_len)
    except GenKwargsError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "gen_kwargs"),
                                       "msg": f"Value error, {e}", "input": gen_kwargs}]) from None


def _ask_again(store, job: Job) -> Job:
    """A job whose run key is posted again, asked for again: its failed items get fresh
    attempts (as `resume` gives them), and a failed job is queued for the pump (which never
    retries failed items itself)."""
    if job.state == JobState.FAILED:
        # NOTE: compare-and-set, items with it: of two racing re-posts one requeues, and a job
        # that moved on since it was read is left as it is now
        store.requeue_failed_job(job.id)
    elif job.num_failed and job.state in (JobState.QUEUED, JobState.RUNNING):
        store.retry_failed_items(job.id)
    return store.get_job(job.id)


# -- errors: one line, no server paths ------------------------------------------------------------

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_PATH = re.compile(r"(?<![\w.~-])(?:~|\.{1,2})?/[^\s'\",)]*")
HIDDEN = "<hidden>"


def _error_status(exc: ConserveError) -> int:
    if isinstance(exc, (StoreUnavailableError, EngineUnavailableError)):
        return 503  # NOTE: an outage, not the request: the same request may succeed later
    if isinstance(exc, JobNotFoundError):
        return 404
    return 409 if isinstance(exc, JobStateError) else 400


def public_message(exc: ConserveError, path_params: dict[str, Any]) -> str:
    """The one line a client is told: never a store URL (the store's errors name it) or a
    path of the server (a data directory's do)."""
    if isinstance(exc, StoreUnavailableError):
        return "the job store is unreachable for now; nothing was lost, try again later"
    if isinstance(exc, JobNotFoundError) and "job_id" in path_params:
        return f"no job {path_params['job_id']!r}"
    return redact(first_line(exc))


def redact(message: str) -> str:
    """`message` with URLs and absolute (or home- or dot-relative) paths hidden."""
    return _PATH.sub(HIDDEN, _URL.sub(HIDDEN, message))


def errors_route_class(conserve_error, validation_error):
    """A route class whose handlers answer a ConserveError with `conserve_error(exc, request)`
    and a malformed body with `validation_error(exc)` (both JSONResponses). NOTE: app-level
    handlers cannot be added: vLLM's app has built its middleware stack already."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.routing import APIRoute

    class ErrorsAsJSON(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def guarded(request):
                try:
                    return await handler(request)
                except ConserveError as exc:
                    return conserve_error(exc, request)
                except RequestValidationError as exc:  # vLLM's app would turn it into a 400
                    return validation_error(exc)

            return guarded

    return ErrorsAsJSON


def _route_class():
    """The job API's errors: a ConserveError with its status and one-line message, a malformed
    body a 422 with FastAPI's detail."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    def conserve_error(exc: ConserveError, request) -> JSONResponse:
        body = {"error": {"message": public_message(exc, request.path_params), "type": type(exc).__name__}}
        return JSONResponse(body, status_code=_error_status(exc))

    return errors_route_class(conserve_error, lambda exc: JSONResponse(
        {"detail": jsonable_encoder(exc.errors())}, status_code=422))
