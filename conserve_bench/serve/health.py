"""What `/health` reports: each part of `serve` that can go down, asked cheaply, by name.

A probe is a function of no arguments that answers `(ok, reason)`: the engine (vLLM's
`AsyncLLM.errored`), the offline pump and its heartbeat (their own `health()`), the store
(`StoreWatch`: no query reached it for longer than a lease). `HealthCheck` asks them all and
answers 200, or 503 naming each part down and why. A probe must be fast and must never
raise into the caller (one that raises counts as down): `/health` runs on the event loop.

vLLM names relied on: docs/vllm-contract.md#health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping

from conserve_bench.errors import one_line_error

log = logging.getLogger(__name__)

Probe = Callable[[], "tuple[bool, str | None]"]


class HealthCheck:
    """Asks every probe; `report()` is (healthy, the JSON body `/health` answers)."""

    def __init__(self, probes: Mapping[str, Probe] | None = None):
        self.probes = dict(probes or {})

    def report(self) -> tuple[bool, dict[str, Any]]:
        down = {name: reason for name, probe in self.probes.items()
                if (reason := _ask(probe)) is not None}
        if not down:
            return True, {"status": "ok"}
        return False, {"status": "unhealthy", "down": down}


def _ask(probe: Probe) -> str | None:
    """None if the part is up, else why it is down."""
    try:
        ok, reason = probe()
    except Exception as e:  # NOTE: a broken probe is a part we cannot vouch for
        return f"its health check failed: {one_line_error(e)}"
    return None if ok else (reason or "down")


def engine_probe(client) -> Probe:
    """Down once vLLM's engine died: it never comes back within this process."""
    def probe() -> tuple[bool, str | None]:
        if client.errored:
            return False, "the engine died (EngineDeadError); serve is exiting"
        return True, None

    return probe


class StoreWatch:
    """Reaches the store every `every_s` (one small read, on a thread: a store in an outage
    retries for up to a lease); `probe` is down once nothing reached it for `max_age_s`."""

    def __init__(self, ping: Callable[[], Any], every_s: float, max_age_s: float):
        self.ping, self.every_s, self.max_age_s = ping, every_s, max_age_s
        self._reached_at = time.monotonic()
        self._last_error: str | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self.poll)
            await asyncio.sleep(self.every_s)

    def poll(self) -> bool:
        try:
            self.ping()
        except Exception as e:
            self._last_error = one_line_error(e)
            log.warning("store unreachable: %s", self._last_error)
            return False
        self._reached_at, self._last_error = time.monotonic(), None
        return True

    def probe(self) -> tuple[bool, str | None]:
        age_s = time.monotonic() - self._reached_at
        if age_s <= self.max_age_s:
            return True, None
        return False, (f"unreachable for {age_s:.0f} s (more than a lease, {self.max_age_s:g} s): "
                       f"{self._last_error or 'no answer'}")
