"""HTTP client of the job API of a running `conserve-bench serve`.

Returns the same JSON objects as the embedded functions, so the CLI prints both alike.
Server-side errors come back as the same typed `ConserveError`s, one line each: a 4xx is the
server's message (exit 2), a 5xx `EngineUnavailableError` (exit 3). A server that is down or
restarting (no connection, 503: its store is out; 502/504 from a proxy) is waited for, with
backoff, up to `max_wait_s`, then `EngineUnavailableError`. It never shows a server-side path
or URL it did not send (a 503's database URL, the server's data folder): they are redacted.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from conserve_bench.config import CHAT_DEFAULTS
from conserve_bench.errors import (ConserveError, EngineUnavailableError, JobNotFoundError, JobStateError,
                                   first_line)
from conserve_bench.store.states import ItemState, JobState

log = logging.getLogger(__name__)

# NOTE: long enough for a supervisor to restart a crashed `serve` (vLLM starts in about a
# minute; a large model on a GPU in a few) and for its store to come back (the server answers
# 503 after one lease, 30 s, of retrying itself); short enough that a dead server fails CI.
SERVER_WAIT_S = 300.0
# A one-off question (`jobs`, `status`, `results`, `cancel`) waits less: a person is watching,
# and a mistyped port should not take five minutes to say so.
QUERY_WAIT_S = 15.0
FIRST_RETRY_S, MAX_RETRY_S = 0.25, 5.0
STOP_CHECK_S = 0.5  # how often a wait asks `should_stop` (a CI deadline, a signal)
# The server did nothing: the connection never opened, or it said it cannot serve now.
NOT_SENT = ("ConnectError", "ConnectTimeout", "PoolTimeout")
# Safe to send again only if sending twice does what sending once does: it may have acted.
MAYBE_ACTED = ("ReadTimeout", "ReadError", "WriteError", "WriteTimeout", "RemoteProtocolError")
MAYBE_ACTED_STATUSES = (502, 504)  # a proxy in front of a server that went away mid-request
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)\]]+")
_PATH = re.compile(r"(?<![\w.~/:-])/[^\s'\"<>:,;)\]]+")


class ServerError(ConserveError):
    pass


class _Transient(Exception):
    """A failure worth waiting out: the server may answer once it is back."""


class JobClient:
    """`max_wait_s`: how long one call keeps retrying a server that is down (0: fail at once);
    `should_stop` ends such a wait early (a CI deadline). `transport`: httpx's, for tests."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0,
                 max_wait_s: float = SERVER_WAIT_S, should_stop: Callable[[], bool] | None = None,
                 transport=None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = _checked_url(base_url)
        self.max_wait_s, self.should_stop = max_wait_s, should_stop or (lambda: False)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s,
                                  transport=transport)

    def submit(self, tasks: list[str], limit=None, num_fewshot=None, data_dir=None,
               gen_kwargs=None, samples=None, run_key: str | None = None,
               **chat: Any) -> dict[str, Any]:
        """Queue a job; with a `run_key` the server holds already, its job is answered (so a
        post with a run key is sent again after a lost answer: it cannot make a second job).
        `chat`: `apply_chat_template`, `fewshot_as_multiturn`, `system_instruction` (JobSpec's),
        sent only when not their defaults (a server older than them takes the rest)."""
        body = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
                "gen_kwargs": gen_kwargs or {}, "data_dir": data_dir, "samples": samples,
                "run_key": run_key, **{k: v for k, v in chat.items() if v != CHAT_DEFAULTS[k]}}
        return self._call("POST", "/v1/jobs", idempotent=run_key is not None, json=body)

    def jobs(self, limit: int) -> dict[str, Any]:
        return self._call("GET", "/v1/jobs", params={"limit": limit})

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def results(self, job_id: str, full: bool = False) -> dict[str, Any]:
        """lm-eval's results object (its results file's); `full`: the per-document table too."""
        return self._call("GET", f"/v1/jobs/{job_id}/results", params={"full": "true"} if full else None)

    def model(self) -> str:
        """The name of the model the server serves."""
        return self._call("GET", "/v1/models")["data"][0]["id"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def submit_requests(self, requests: list[dict[str, Any]], label: str = "lm-eval",
                        chat_template_sha256: str | None = None) -> dict[str, Any]:
        """Queue lm-eval requests (`{"kind", "args"}`); the job's JSON plus each request's key.
        `chat_template_sha256`: the chat template that rendered their contexts, recorded."""
        body = {"requests": requests, "label": label}
        if chat_template_sha256 is not None:
            body["chat_template_sha256"] = chat_template_sha256
        return self._call("POST", "/v1/jobs/requests", json=body)

    def served_model(self) -> dict[str, Any]:
        """What the server's engine runs: `model`, `dtype`, `max_model_len`, `add_bos_token`,
        `fingerprint`."""
        return self._call("GET", "/v1/jobs/model")

    def chat_templates(self) -> dict[str, Any]:
        """The served model's chat templates (`engine.chat.ChatTemplates.to_dict`)."""
        return self._call("GET", "/v1/jobs/chat-templates")

    def item_results(self, job_id: str, page_size: int = 1000) -> dict[str, Any]:
        """Key -> result of every finished item of a job, fetched page by page."""
        results: dict[str, Any] = {}
        offset: int | None = 0
        while offset is not None:
            page = self._call("GET", f"/v1/jobs/{job_id}/items",
                              params={"offset": offset, "limit": page_size})
            results.update({i["key"]: i["result"] for i in page["items"] if i["state"] == ItemState.DONE})
            offset = page["next_offset"]
        return results

    # -- OpenAI's Files and Batch APIs (`serve.batchapi`) --

    def upload_file(self, content: bytes, filename: str, purpose: str = "batch") -> dict[str, Any]:
        return self._call("POST", "/v1/files", files={"file": (filename, content)},
                          data={"purpose": purpose})

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None = None) -> dict[str, Any]:
        return self._call("POST", "/v1/batches", json={
            "input_file_id": input_file_id, "endpoint": endpoint,
            "completion_window": completion_window, "metadata": metadata})

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/batches/{batch_id}")

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/batches/{batch_id}/cancel", idempotent=True)

    def file_content(self, file_id: str) -> bytes:
        return self._call("GET", f"/v1/files/{file_id}/content", raw=True)

    def wait(self, job_id: str, on_progress: Callable[[int, int], None], poll_s: float = 1.0):
        while True:
            status = self.status(job_id)
            on_progress(status["done"], status["total"])
            if JobState(status["state"]).is_final:
                return status
            time.sleep(poll_s)

    def _call(self, method: str, path: str, idempotent: bool | None = None, **kwargs) -> dict[str, Any]:
        """One request, sent again while the server is down, for up to `max_wait_s`.

        NOTE: GETs are sent again after any failure; a POST only when the server cannot have
        acted on it (no connection, or a 503, which the server answers before it writes),
        unless the caller says sending it twice is harmless (`idempotent`).
        """
        idempotent = method == "GET" if idempotent is None else idempotent
        sent = _sent_strings(self.base_url, path, kwargs.get("json"))
        patience = _Patience(self.max_wait_s, self.should_stop)
        while True:
            try:
                return self._attempt(method, path, idempotent, sent, **kwargs)
            except _Transient as e:
                problem = str(e)
            if not patience.wait(problem):
                raise EngineUnavailableError(f"{problem}{patience.outcome()}") from None

    def _attempt(self, method: str, path: str, idempotent: bool, sent: list[str], raw: bool = False,
                 **kwargs) -> Any:
        """One try: the answer (its JSON; with `raw`, its bytes), a `ConserveError` to give up
        with, or `_Transient`."""
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            reason = f"cannot reach {self.base_url}: {redact(first_line(e), sent)}"
            if _is_any(e, NOT_SENT) or (idempotent and _is_any(e, MAYBE_ACTED)):
                raise _Transient(reason) from None
            raise EngineUnavailableError(reason) from None
        if response.status_code == 503 or (idempotent and response.status_code in MAYBE_ACTED_STATUSES):
            raise _Transient(f"{self.base_url} answered {response.status_code}{_detail(response, sent)}")
        if response.status_code >= 400:
            raise _error(response, sent)
        if raw:
            return response.content
        try:
            return response.json()
        except ValueError:
            raise EngineUnavailableError(f"{self.base_url}: answered {response.status_code} without "
                                         "JSON: not a conserve-bench server?") from None


class _Patience:
    """Backoff delays (doubling from `FIRST_RETRY_S`) until `max_wait_s` or a stop."""

    def __init__(self, max_wait_s: float, should_stop: Callable[[], bool]):
        self.started = time.monotonic()
        self.give_up_at = self.started + max_wait_s
        self.should_stop, self.delay, self.stopped = should_stop, FIRST_RETRY_S, False

    def wait(self, problem: str) -> bool:
        """Sleep the next delay (the last one ends at the bound); False once the bound is reached."""
        now = time.monotonic()
        if now >= self.give_up_at:
            return False
        if self.delay == FIRST_RETRY_S:
            log.warning("%s; retrying for up to %.0f s", problem, self.give_up_at - self.started)
        wake_at = min(now + self.delay, self.give_up_at)
        while (left := wake_at - time.monotonic()) > 0:
            if self.should_stop():
                self.stopped = True
                return False
            time.sleep(min(left, STOP_CHECK_S))
        self.delay = min(2 * self.delay, MAX_RETRY_S)
        return True

    def outcome(self) -> str:
        """How the wait ended, for the error's message."""
        waited = time.monotonic() - self.started
        if self.stopped:
            return f" (stopped waiting after {waited:.0f} s)"
        return f" (still so after {waited:.0f} s of retrying)" if waited >= FIRST_RETRY_S else ""


def _is_any(error: Exception, names: tuple[str, ...]) -> bool:
    import httpx

    return isinstance(error, tuple(getattr(httpx, name) for name in names))


def redact(message: str, sent: Iterable[str] = ()) -> str:
    """`message` with every URL and absolute path the client did not send replaced: a server's
    own (its database URL, its folders) is none of the client's business."""
    kept = [s.rstrip("/") for s in sent if len(s.rstrip("/")) > 1]

    def replace(found: re.Match, what: str) -> str:
        token = found.group(0)
        return token if any(_extends(token, s) for s in kept) else what

    message = _URL.sub(lambda m: replace(m, "<server URL>"), message)
    return _PATH.sub(lambda m: replace(m, "<server path>"), message)


def _extends(token: str, sent: str) -> bool:
    """`token` is `sent` or a path under it (`/data/mmlu/test` under `/data/mmlu`)."""
    return token.startswith(sent) and not re.match(r"[\w-]", token[len(sent):len(sent) + 1])


def _checked_url(base_url: str) -> str:
    import httpx

    try:
        scheme = httpx.URL(base_url).scheme
    except httpx.InvalidURL:
        scheme = ""
    if scheme not in ("http", "https"):
        raise ServerError(f"server URL {base_url!r}: not an http:// or https:// URL")
    return base_url.rstrip("/")


def _sent_strings(base_url: str, path: str, body: Any) -> list[str]:
    """Every string of a request: what a server's message may repeat back to the client."""
    return [base_url, f"{base_url}{path}", *_strings(body)]


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _message(response, sent: list[str]) -> str | None:
    """The server's one-line error message (`{"error": {"message"}}`), redacted."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return redact(first_line(message), sent) if isinstance(message, str) and message.strip() else None


def _detail(response, sent: list[str]) -> str:
    message = _message(response, sent)
    return f": {message}" if message else ""


def _error(response, sent: list[str]) -> ConserveError:
    if response.status_code == 401:
        return ServerError("unauthorized: pass the server's key with --api-key")
    if response.status_code == 422:
        return ServerError(f"invalid job spec: {_validation_problem(response, sent)}")
    message = _message(response, sent)
    if response.status_code >= 500:  # the server or its engine failed, not the request
        return EngineUnavailableError(f"{response.status_code} from the server: {message or 'no detail'}")
    cls = {404: JobNotFoundError, 409: JobStateError}.get(response.status_code, ServerError)
    return cls(message or f"server answered {response.status_code}")


def _validation_problem(response, sent: list[str]) -> str:
    """`field: problem` of FastAPI's first validation error."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    first = detail[0] if isinstance(detail, list) and detail and isinstance(detail[0], dict) else {}
    field = ".".join(str(p) for p in first.get("loc", [])[1:]) or "body"
    return redact(f"{field}: {first_line(str(first.get('msg', 'invalid')))}", sent)
