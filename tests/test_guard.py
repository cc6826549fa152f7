"""The guard in front of `serve`: key, body cap, online priority, stamps and samples, health.

Requests go through the guard by hand (ASGI messages), into a small FastAPI app that records
what reaches it, and, for the routes, into vLLM's own app as `serve` builds it (no engine).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import REGISTRY
from pydantic import BaseModel

from conserve_bench.vllm_plugin.overrides import ONLINE_PRIORITY
from conserve_bench.serve.arrivals import ADMITTED
from conserve_bench.serve.guard import Guard, GuardConfig, generation_routes
from conserve_bench.serve.health import HealthCheck, StoreWatch, engine_probe
from conserve_bench.serve.metrics import OnlineMetrics

KEY = "s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}


# -- driving an ASGI app by hand --------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)

    def json(self):
        return json.loads(b"".join(self.chunks))


def call(app, method: str, path: str, body: bytes | list[bytes] = b"", headers: dict | None = None,
         content_length: bool = True) -> Answer:
    """One HTTP request through `app`. A list body arrives in chunks without Content-Length
    (chunked transfer), as a client streaming its upload sends it."""
    headers = dict(headers or {})
    if isinstance(body, bytes) and content_length:
        headers.setdefault("content-length", str(len(body)))
    chunks = body if isinstance(body, list) else [body]
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks[:-1]]
    messages.append({"type": "http.request", "body": chunks[-1], "more_body": False})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "server": ("test", 80), "client": ("127.0.0.1", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # NOTE: the client stays connected until answered

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return Answer(start["status"], {k.decode(): v.decode() for k, v in start.get("headers", [])},
                  [m.get("body", b"") for m in sent if m["type"] == "http.response.body"])


def post_json(app, path: str, payload, headers: dict | None = None) -> Answer:
    return call(app, "POST", path, json.dumps(payload).encode(), {**JSON, **(headers or {})})


# -- a small app that records what reaches it -------------------------------------------------


class Prompt(BaseModel):
    prompt: str = ""
    priority: int = 0
    stream: bool = False
    fail: bool = False  # answer 400, streamed


class Tokens(BaseModel):
    prompt: str = ""


def recording_app() -> tuple[FastAPI, list]:
    app, seen = FastAPI(), []
    app.state.admitted = []  # ADMITTED as the completions handler and its stream saw it

    @app.post("/v1/completions")
    async def completions(request: Prompt):
        seen.append(("/v1/completions", request.model_dump()))
        app.state.admitted.append(ADMITTED.get())
        if request.stream:
            async def chunks():  # NOTE: run by the response, as vLLM's streams are
                app.state.admitted.append(ADMITTED.get())
                for chunk in (b"a", b"b", b"c"):
                    yield chunk
            return StreamingResponse(chunks(), status_code=400 if request.fail else 200)
        return request.model_dump()

    @app.post("/invocations")  # NOTE: as vLLM's: the body is parsed by hand
    async def invocations(raw: Request):
        body = await raw.json()
        seen.append(("/invocations", body))
        return body

    @app.post("/tokenize")
    async def tokenize(request: Tokens, raw: Request):
        seen.append(("/tokenize", json.loads(await raw.body())))
        return {"tokens": [1, 2]}

    @app.post("/v1/jobs/requests")
    async def bulk(raw: Request):
        seen.append(("/v1/jobs/requests", len(await raw.body())))
        return {"ok": True}

    @app.get("/v1/models")
    async def models():
        seen.append(("/v1/models", None))
        return {"data": []}

    @app.get("/metrics")
    async def metrics():
        seen.append(("/metrics", None))
        return PlainTextResponse("conserve_x 1\n")

    return app, seen


class Stamps:
    """Counts `announce()` calls, numbering them as `ArrivalSignal` does."""

    def __init__(self):
        self.num_stamps = 0

    def announce(self) -> int:
        self.num_stamps += 1
        return self.num_stamps


@pytest.fixture(scope="module")
def paths():
    """The small app's engine routes, read off it (what `serve` does with vLLM's)."""
    return generation_routes(recording_app()[0])


def guarded(paths, health=None, **cfg):
    app, seen = recording_app()
    stamps = Stamps()
    guard = Guard(app, GuardConfig(**{"api_key": KEY, **cfg}), paths, health,
                  OnlineMetrics(ttft_slo_s=1.0, tbt_slo_s=1.0), stamps)
    return guard, seen, stamps


def samples(name: str) -> float:
    return REGISTRY.get_sample_value(f"conserve_online_{name}_seconds_count") or 0.0


# -- the routes that run the engine ----------------------------------------------------------


def test_engine_routes_are_read_off_the_app(paths):
    """A body model that takes a priority or a token limit runs the engine; /invocations
    dispatches to vLLM's completion and chat models, so it does too."""
    assert paths == ("/v1/completions", "/invocations")


@pytest.fixture(scope="module")
def vllm_app():
    """vLLM's own app as `serve` builds it, with a key (no engine: nothing reaches a handler)."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", "--api-key", KEY])
    return build_app(args, ("generate",), None)


def _body_models(app) -> list:
    import typing

    from fastapi.routing import APIRoute
    from pydantic import BaseModel as Model

    annotations = [p.field_info.annotation for r in app.routes if isinstance(r, APIRoute)
                   for p in r.dependant.body_params]
    return [t for a in annotations for t in (a, *typing.get_args(a))
            if isinstance(t, type) and issubclass(t, Model)]


def test_vllms_engine_routes_include_what_vllms_own_key_check_misses(vllm_app):
    from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

    found = set(generation_routes(vllm_app))
    assert {"/v1/completions", "/v1/chat/completions", "/invocations", "/v1/responses",
            "/v1/messages", "/generative_scoring"} <= found
    assert not found & {"/tokenize", "/detokenize", "/v1/models", "/health", "/metrics"}
    # the guard rewrites only a priority the client sent: vLLM's default must be online's
    defaults = {m.__name__: m.model_fields["priority"].default for m in _body_models(vllm_app)
                if "priority" in m.model_fields}
    assert len(defaults) >= 4 and set(defaults.values()) == {ONLINE_PRIORITY}, defaults
    # vLLM 0.32.0's own check leaves these open: the guard is what closes them
    assert [p for p in ("/invocations", "/tokenize", "/detokenize", "/generative_scoring")
            if not p.startswith(GUARDED_PREFIX)] == ["/invocations", "/tokenize", "/detokenize",
                                                    "/generative_scoring"]


def test_every_route_of_vllms_app_but_health_needs_the_key(vllm_app):
    from fastapi.routing import APIRoute

    guard = Guard(vllm_app, GuardConfig(api_key=KEY), generation_routes(vllm_app))
    routes = [(sorted(r.methods)[0], r.path.replace("{", "").replace("}", ""))
              for r in vllm_app.routes if isinstance(r, APIRoute) and r.path != "/health"]
    assert len(routes) > 20
    answers = {path: call(guard, method, path, b"{}", JSON).status for method, path in routes}
    assert set(answers.values()) == {401}, answers
    assert call(guard, "GET", "/health").status == 200


# -- the key ---------------------------------------------------------------------------------


def test_every_route_but_health_needs_the_key(paths):
    guard, seen, _ = guarded(paths)
    routes = [("POST", "/v1/completions"), ("POST", "/invocations"), ("POST", "/tokenize"),
              ("POST", "/v1/jobs/requests"), ("GET", "/v1/models"), ("GET", "/metrics")]
    for method, path in routes:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                        {"authorization": f"Basic {KEY}"}):
            assert call(guard, method, path, b"{}", {**JSON, **headers}).status == 401, (path, headers)
    assert seen == []  # nothing reached the app
    for method, path in routes:
        assert call(guard, method, path, b"{}", {**JSON, "authorization": f"bearer {KEY}"}).status == 200, path
    health = call(guard, "GET", "/health")
    assert (health.status, health.json()) == (200, {"status": "ok"})


def test_metrics_are_public_only_with_public_metrics(paths):
    closed, _, _ = guarded(paths)
    opened, seen, _ = guarded(paths, public_metrics=True)
    assert call(closed, "GET", "/metrics").status == 401
    assert call(opened, "GET", "/metrics").status == 200 and seen == [("/metrics", None)]
    assert call(opened, "GET", "/v1/models").status == 401  # nothing else is public
    no_key, seen, _ = guarded(paths, api_key=None)  # loopback: no key, nothing to check
    assert call(no_key, "GET", "/v1/models").status == 200


def test_a_websocket_needs_the_key_too(paths):
    guard, _, _ = guarded(paths)
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/realtime", "root_path": "", "headers": []}
    asyncio.run(guard(scope, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]


# -- online priority -------------------------------------------------------------------------


def test_priority_is_forced_online_on_every_engine_route(paths):
    guard, seen, _ = guarded(paths)
    for path in ("/v1/completions", "/invocations"):
        assert post_json(guard, path, {"prompt": "x", "priority": -100}, AUTH).status == 200
    # a duplicate key means to the app what it meant to the guard: re-encoded from the parse
    duplicate = b'{"prompt": "x", "priority": 0, "priority": -100}'
    assert call(guard, "POST", "/invocations", duplicate, {**JSON, **AUTH}).status == 200
    assert [body["priority"] for _, body in seen] == [0, 0, 0]
    post_json(guard, "/tokenize", {"prompt": "x", "priority": -100}, AUTH)
    assert seen[-1] == ("/tokenize", {"prompt": "x", "priority": -100})  # runs nothing: left alone


# -- the body cap ----------------------------------------------------------------------------


def test_a_body_past_the_cap_is_413_before_it_is_read(paths):
    guard, seen, stamps = guarded(paths, max_request_bytes=100)
    big = json.dumps({"prompt": "x" * 200}).encode()
    for path in ("/v1/completions", "/tokenize", "/v1/models"):
        answer = call(guard, "POST", path, big, {**JSON, **AUTH})
        assert answer.status == 413 and "100 bytes" in answer.json()["error"]["message"], path
    # declared: answered before a byte is read (the whole body is still unsent)
    declared = call(guard, "POST", "/tokenize", [b"{", b"}"], {**JSON, **AUTH, "content-length": "101"})
    assert declared.status == 413
    # chunked, no Content-Length: counted as it comes
    chunked = call(guard, "POST", "/v1/completions", [b'{"prompt": "', b"x" * 60, b"y" * 60, b'"}'],
                   {**JSON, **AUTH})
    assert chunked.status == 413
    assert seen == [] and stamps.num_stamps == 0
    at_cap = json.dumps({"prompt": "x" * 86}).encode()
    assert len(at_cap) == 100
    assert call(guard, "POST", "/v1/completions", [at_cap[:50], at_cap[50:]], {**JSON, **AUTH}).status == 200


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError, match="--max-request-bytes"):
        GuardConfig(max_request_bytes=0)


# -- arrivals and latency samples --------------------------------------------------------------


def test_only_admitted_requests_are_announced_or_add_latency_samples(paths):
    guard, seen, stamps = guarded(paths)
    ttft, tbt = samples("ttft"), samples("tbt")
    stream = {"prompt": "x", "stream": True}
    for _ in range(100):
        assert post_json(guard, "/v1/completions", stream).status == 401
    assert call(guard, "POST", "/v1/completions", b'{"prompt": ', {**JSON, **AUTH}).status >= 400
    assert call(guard, "POST", "/v1/completions", b"[1, 2]", {**JSON, **AUTH}).status >= 400
    assert call(guard, "POST", "/invocations", json.dumps(stream).encode(),
                {**AUTH, "content-type": "text/plain"}).status == 200  # vLLM's would answer 415
    assert stamps.num_stamps == 0 and (samples("ttft"), samples("tbt")) == (ttft, tbt)

    failed = post_json(guard, "/v1/completions", {**stream, "fail": True}, AUTH)
    assert failed.status == 400 and stamps.num_stamps == 1
    assert (samples("ttft"), samples("tbt")) == (ttft, tbt)  # admitted, but an error: no sample

    answer = post_json(guard, "/v1/completions", stream, AUTH)
    assert answer.status == 200 and b"".join(answer.chunks) == b"abc"
    assert stamps.num_stamps == 2
    assert (samples("ttft"), samples("tbt")) == (ttft + 1, tbt + 2)  # three chunks: one TTFT, two TBT
    # the handler, and the stream it returns, see the number their request was announced as
    assert guard.app.state.admitted == [1, 1, 2, 2]
    assert ADMITTED.get() is None  # and nothing outside a request does


def test_the_engine_client_carries_the_admission_number_into_sampling_params():
    from vllm import SamplingParams

    from conserve_bench.serve.arrivals import tag_arrivals
    from conserve_bench.vllm_plugin.overrides import ARRIVAL_KEY

    calls = []

    class Client:
        def generate(self, prompt, params, request_id, priority=0):
            calls.append((request_id, priority, params.extra_args))
            return "outputs"

    client = Client()
    tag_arrivals(client)
    assert client.generate("p", SamplingParams(), "offline", priority=1) == "outputs"
    token = ADMITTED.set(7)
    try:
        client.generate("p", SamplingParams(extra_args={"user": 1}), "online")
    finally:
        ADMITTED.reset(token)
    assert calls == [("offline", 1, None), ("online", 0, {"user": 1, ARRIVAL_KEY: 7})]


# -- /health ---------------------------------------------------------------------------------


def test_health_is_503_naming_each_part_down(paths):
    parts = {"engine": (True, None), "pump": (True, None)}

    def pump_probe():
        return parts["pump"]

    def broken_probe():
        raise RuntimeError("no answer")

    health = HealthCheck({"engine": lambda: parts["engine"], "pump": pump_probe})
    guard, seen, _ = guarded(paths, health=health)
    assert call(guard, "GET", "/health").status == 200
    parts["pump"] = (False, "the offline pump's thread died")
    down = call(guard, "GET", "/health")
    assert down.status == 503
    assert down.json() == {"status": "unhealthy", "down": {"pump": "the offline pump's thread died"}}
    parts["pump"] = (True, None)
    health.probes["store"] = broken_probe
    assert call(guard, "GET", "/health").json()["down"] == {
        "store": "its health check failed: RuntimeError: no answer"}
    assert call(guard, "POST", "/health").status == 405 and seen == []


def test_the_engine_probe_reads_vllms_errored_flag():
    class Client:
        errored = False

    probe = engine_probe(Client)
    assert probe() == (True, None)
    Client.errored = True
    assert probe()[0] is False and "engine died" in probe()[1]


def test_the_store_is_down_once_unreachable_for_longer_than_a_lease():
    outage = {"on": False}

    def ping():
        if outage["on"]:
            raise ConnectionError("connection refused")

    watch = StoreWatch(ping, every_s=0.01, max_age_s=0.05)
    assert watch.poll() and watch.probe() == (True, None)
    outage["on"] = True
    assert not watch.poll() and watch.probe() == (True, None)  # within a lease: still up
    import time

    time.sleep(0.06)
    ok, reason = watch.probe()
    assert not ok and "ConnectionError: connection refused" in reason
    outage["on"] = False
    assert watch.poll() and watch.probe() == (True, None)
