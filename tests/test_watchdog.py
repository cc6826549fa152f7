"""`serve` stops, and says so, when its engine dies: a real uvicorn server, a fake engine client.

vLLM's `AsyncLLM.errored` turns true once its engine-core process is gone; the watchdog then
stops the pump's admissions and the server, the pump gives its items back (`stop`), and
`serve_until_stopped` raises `EngineUnavailableError` (the CLI's exit 3). A stop signal drains
the same way but raises nothing. (The real engine's death: tests/test_server.py.)
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import uvicorn

from conserve_bench.errors import EngineUnavailableError
from conserve_bench.serve.guard import Guard
from conserve_bench.serve.health import HealthCheck, StoreWatch
from conserve_bench.serve.server import (DrainingServer, ServeConfig, ServeConfigError, health_probes,
                                         serve_until_stopped)
from conserve_bench.store.pgcluster import free_port


class FakeEngineClient:
    """What the watchdog reads of vLLM's `AsyncLLM`."""

    errored = False


class RecordingPump:
    """What the server calls on `serve.pump.OfflinePump`, recorded in order."""

    def __init__(self):
        self.calls: list[str] = []
        self.fatal: str | None = None

    def request_stop(self) -> None:
        self.calls.append("request_stop")

    def stop(self) -> None:
        self.calls.append("stop")

    def health(self):
        return (self.fatal is None, self.fatal)


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


def run_server(until, engine, pump) -> tuple[float, BaseException | None]:
    """Serve `hello` on a free port; `until(url, server)` runs once it answers. Returns how
    long after `until` the server stopped, and what `serve_until_stopped` raised."""
    server = DrainingServer(uvicorn.Config(hello, host="127.0.0.1", port=free_port(), log_level="warning"))
    url = f"http://{server.config.host}:{server.config.port}"

    async def main():
        serving = asyncio.create_task(serve_until_stopped(server, pump, engine, watchdog_poll_s=0.05))
        async with httpx.AsyncClient() as http:
            while not server.started:
                await asyncio.sleep(0.05)
            assert (await http.get(url)).text == "hi"
        until(server)
        stopped_at = time.monotonic()
        try:
            await asyncio.wait_for(serving, timeout=10)
        except EngineUnavailableError as e:
            return time.monotonic() - stopped_at, e
        return time.monotonic() - stopped_at, None

    return asyncio.run(main())


def test_an_engine_death_stops_the_server_gives_items_back_and_exits_3():
    engine, pump = FakeEngineClient(), RecordingPump()
    took_s, error = run_server(lambda server: setattr(engine, "errored", True), engine, pump)
    assert isinstance(error, EngineUnavailableError) and error.exit_code == 3
    assert "the engine died" in str(error) and "back to pending" in str(error)
    assert "\n" not in str(error)  # the CLI prints it as one line
    assert pump.calls == ["request_stop", "stop"]  # no new work, then the items back
    assert took_s < 5


def test_a_pump_stopped_for_good_stops_the_server_too():
    engine, pump = FakeEngineClient(), RecordingPump()
    _, error = run_server(lambda server: setattr(pump, "fatal", "the offline pump's thread died"),
                          engine, pump)
    assert isinstance(error, EngineUnavailableError) and "thread died" in str(error)
    assert pump.calls == ["request_stop", "stop"]


def test_a_stop_signal_drains_and_raises_nothing():
    engine, pump = FakeEngineClient(), RecordingPump()
    _, error = run_server(lambda server: setattr(server, "should_exit", True), engine, pump)
    assert error is None and pump.calls == ["stop"]


def test_health_asks_the_pump_and_heartbeat_only_when_the_pump_runs(tmp_path):
    class Replica:
        def health(self):
            return False, "replica w renewed no lease for 40.0 s (lease 30 s)"

    pump, engine = RecordingPump(), FakeEngineClient()
    pump.replica = Replica()
    store = StoreWatch(lambda: None, every_s=1.0, max_age_s=30.0)
    conserve = HealthCheck(health_probes(ServeConfig(policy="priority", profile=False), engine, pump, store))
    assert conserve.report() == (False, {"status": "unhealthy", "down": {
        "heartbeat": "replica w renewed no lease for 40.0 s (lease 30 s)"}})
    online_only = HealthCheck(health_probes(ServeConfig(policy="online-only", profile=False),
                                            engine, pump, store))
    assert online_only.report() == (True, {"status": "ok"})
    engine.errored = True
    assert set(online_only.report()[1]["down"]) == {"engine"}


def test_the_guard_settings_are_checked_with_the_rest_of_the_config():
    with pytest.raises(ServeConfigError, match="--max-request-bytes"):
        ServeConfig(max_request_bytes=0, profile=False, policy="priority")
    guard = ServeConfig(api_key="k", public_metrics=True, profile=False, policy="priority").guard
    assert guard.is_public("/metrics") and not guard.is_public("/invocations")
    assert guard.max_request_bytes == 1 << 20  # one limit for every route, the job API's too


def test_the_guard_answers_health_from_the_servers_probes():
    """What `_serve` wires: a dead engine makes `/health` 503 through the guard."""
    engine, pump = FakeEngineClient(), RecordingPump()
    store = StoreWatch(lambda: None, every_s=1.0, max_age_s=30.0)
    probes = health_probes(ServeConfig(policy="online-only", profile=False), engine, pump, store)
    guard = Guard(hello, ServeConfig(api_key="k", profile=False, policy="priority").guard,
                  health=HealthCheck(probes))
    transport = httpx.ASGITransport(app=guard)

    async def get(path):
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as http:
            return await http.get(path)

    assert asyncio.run(get("/health")).status_code == 200
    assert asyncio.run(get("/")).status_code == 401
    engine.errored = True
    dead = asyncio.run(get("/health"))
    assert dead.status_code == 503 and "engine" in dead.json()["down"]
