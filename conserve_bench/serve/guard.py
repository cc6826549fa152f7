"""The one guard in front of everything `serve` answers: key, body size, priority, arrivals.

Every HTTP and WebSocket request passes `Guard` before vLLM's app (and the job API in it).
With an API key, every path but `/health` needs `Authorization: Bearer KEY`, `/metrics` too
unless public: vLLM's own check guards only `/v1`, `/v2`, `/inference` and `/cohere`. Every
body is capped: 413 before it is parsed. On the routes that run the engine
(`generation_routes`, read off the app) priority is forced online, and only a request that
passed the key and parsed as a JSON object is announced as an arrival (the running offline
step is cut while it waits for the engine: `serve.arrivals`) or adds a latency sample (and only with a status below 400). It answers `/health` from
a `health.HealthCheck`. It never generates, and never touches the store or the engine.

vLLM names relied on: docs/vllm-contract.md#guard.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import typing
from dataclasses import dataclass
from typing import Any, Iterable

from conserve_bench.serve.arrivals import ADMITTED
from conserve_bench.vllm_plugin.arrivals import ArrivalSignal
from conserve_bench.vllm_plugin.overrides import ONLINE_PRIORITY
from conserve_bench.serve.health import HealthCheck

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: a long prompt is a few hundred KiB
DEFAULT_MAX_UPLOAD_BYTES = 200 << 20  # a batch input file (`/v1/files`): OpenAI's own cap
UPLOAD_PATH = "/v1/files"
HEALTH_PATH, METRICS_PATH, INVOCATIONS_PATH = "/health", "/metrics", "/invocations"
ENGINE_FIELDS = ("priority", "max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(frozen=True)
class GuardConfig:
    """One body limit for every route but uploads (`max_upload_bytes`, a batch's input file):
    clients that send much (lm-eval's requests in client mode, `harness.backends`) split
    their posts under it."""

    api_key: str | None = None
    public_metrics: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES

    def __post_init__(self):
        for flag, value in (("--max-request-bytes", self.max_request_bytes),
                            ("--max-batch-file-bytes", self.max_upload_bytes)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{flag}: the body limit must be a positive byte count, got {value!r}")

    def body_limit(self, method: str, path: str) -> int:
        return self.max_upload_bytes if method == "POST" and path == UPLOAD_PATH else self.max_request_bytes

    def is_public(self, path: str) -> bool:
        if not self.api_key or path == HEALTH_PATH:
            return True
        return self.public_metrics and (path == METRICS_PATH or path.startswith(METRICS_PATH + "/"))


class Guard:
    """Wraps the whole ASGI app (vLLM's middleware stack is built already: ours goes outside).
    `generation_paths`: route templates (`/v1/completions`) of the requests that run the
    engine; `metrics`: `metrics.OnlineMetrics` or None; `arrivals`: announced per admitted one."""

    def __init__(self, app, cfg: GuardConfig, generation_paths: Iterable[str] = (),
                 health: HealthCheck | None = None, metrics=None,
                 arrivals: ArrivalSignal | None = None):
        self.app, self.cfg, self.metrics, self.arrivals = app, cfg, metrics, arrivals
        self.health = health or HealthCheck()
        from starlette.routing import compile_path  # NOTE: here, so the CLI starts without it

        self._generation = [compile_path(path)[0] for path in generation_paths]
        self._key_hash = _sha256(cfg.api_key) if cfg.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if scope["type"] == "http" and path == HEALTH_PATH:
            return await self._answer_health(scope, send)
        if not self._authorized(scope, path):
            return await _deny(scope, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        body = await _read_body(scope, receive, send, self.cfg.body_limit(scope["method"], path))
        if body is None:
            return None  # answered 413, or the client left
        if scope["method"] == "POST" and any(p.match(path) for p in self._generation):
            return await self._online(scope, body, receive, send)
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope, path: str) -> bool:
        # NOTE: OPTIONS passes as in vLLM's own check: a CORS preflight carries no key, and
        # it reaches no handler (CORS answers it, the router refuses other OPTIONS with 405).
        if self.cfg.is_public(path) or scope.get("method") == "OPTIONS":
            return True
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        # NOTE: equal-length digests, compared in constant time: the key leaks nothing by timing
        return scheme.lower() == "bearer" and secrets.compare_digest(_sha256(token.strip()), self._key_hash)

    async def _online(self, scope, body: bytes, receive, send):
        """A request that runs the engine: online priority; announced and timed once valid."""
        payload = _json_object(body)
        if payload is None:  # not a JSON object: vLLM answers 400/422 and runs nothing
            return await self.app(scope, _replay(body, receive), send)
        if "priority" in payload:
            # NOTE: clients cannot jump ahead of or fall behind online work; re-encoded from
            # the parsed object, so a duplicate key means here what it means to vLLM.
            payload["priority"] = ONLINE_PRIORITY
            body = json.dumps(payload).encode()
            scope = _with_content_length(scope, len(body))
        admitted = None
        if _media_type(scope) == "application/json":  # what vLLM admits (validate_json_request)
            if self.arrivals is not None:
                # NOTE: first thing once admitted: the engine cuts its offline step while this
                # number waits, and learns it from the request (`arrivals.tag_arrivals`)
                admitted = ADMITTED.set(self.arrivals.announce())
            if self.metrics is not None:
                send = _timed(send, self.metrics.start_online(streaming=payload.get("stream") is True))
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            if admitted is not None:
                ADMITTED.reset(admitted)

    async def _answer_health(self, scope, send):
        if scope["method"] not in ("GET", "HEAD"):
            return await _respond(send, 405, _error("use GET /health", "MethodNotAllowed"),
                                  [(b"allow", b"GET, HEAD")])
        healthy, body = self.health.report()
        await _respond(send, 200 if healthy else 503, body)


def generation_routes(app, supported_tasks: tuple[str, ...] = ("generate",),
                      model_config=None) -> tuple[str, ...]:
    """The paths of `app`'s routes that run the engine: a JSON body whose model takes a
    `priority` or a token limit (`ENGINE_FIELDS`), and `/invocations`, which dispatches to such
    models (vLLM's SageMaker route, whose body is parsed by hand)."""
    from fastapi.routing import APIRoute

    paths = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        if route.path == INVOCATIONS_PATH:
            models = _invocation_models(supported_tasks, model_config)
        else:
            models = [m for param in route.dependant.body_params for m in _models(param.field_info.annotation)]
        if any(name in m.model_fields for m in models for name in ENGINE_FIELDS):
            paths.append(route.path)
    return tuple(dict.fromkeys(paths))


def _invocation_models(supported_tasks, model_config) -> list:
    from vllm.entrypoints.generate.factories import get_generate_invocation_types
    from vllm.entrypoints.pooling.factories import get_pooling_invocation_types

    types = (get_generate_invocation_types(supported_tasks, model_config)
             + get_pooling_invocation_types(supported_tasks, model_config))
    return [m for request_type, _ in types for m in _models(request_type)]


def _models(annotation) -> list:
    """The pydantic models in a body annotation (`A | B`, `Annotated[A, ...]`, `A`)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


async def _read_body(scope, receive, send, max_bytes: int) -> bytes | None:
    """The whole body, or None once answered 413 (declared or counted past `max_bytes`) or
    once the client left. NOTE: counted as it comes, so a chunked body cannot pass the cap."""
    declared = _header(scope, b"content-length")
    if declared.isdigit() and int(declared) > max_bytes:
        return await _too_large(send, max_bytes)
    chunks, num_bytes = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            return await _too_large(send, max_bytes)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _too_large(send, max_bytes: int) -> None:
    # NOTE: the rest of the body is never read: the connection closes after the answer
    message = f"request body larger than {max_bytes} bytes (--max-request-bytes)"
    await _respond(send, 413, _error(message, "RequestTooLarge"), [(b"connection", b"close")])


async def _deny(scope, send) -> None:
    if scope["type"] == "websocket":
        return await send({"type": "websocket.close", "code": 1008})  # policy violation
    await _respond(send, 401, _error("unauthorized: send the server's key as Authorization: Bearer KEY",
                                     "Unauthorized"), [(b"www-authenticate", b"Bearer")])


async def _respond(send, status: int, body: dict[str, Any], headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def _replay(body: bytes, receive):
    """`receive` that yields `body` once, then the client's own messages (disconnects)."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _timed(send, timer):
    async def timed_send(message):
        timer.observe(message)
        await send(message)

    return timed_send


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _header(scope, name: bytes) -> str:
    """A request header's value ("" if absent); ASGI gives the names lower-case."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def _media_type(scope) -> str:
    return _header(scope, b"content-type").split(";", 1)[0].strip().lower()


def _with_content_length(scope, num_bytes: int) -> dict:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"transfer-encoding")]
    return {**scope, "headers": [*headers, (b"content-length", str(num_bytes).encode())]}


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}
