"""Fault injection: the one place where the fault suite makes the product misbehave on purpose.

Armed only by the environment variable `CONSERVE_BENCH_FAULTS`, which the fault suite (tests,
`benchmarks/faults.py`) sets on a process it starts, never the product itself: a
comma-separated list of `point` (fail every time), `point:N` (fail the first N times) or
`hook=VALUE`. `fault_point(name)` raises `InjectedFault` where its point is armed; unarmed,
it costs one dict lookup. `fault_hook(name)` hands a component the value a hook was given
(e.g. a `SharedInts` file the suite steers it through), or None. Every point and hook is
listed in POINTS and HOOKS, so a typo fails loudly; no product configuration carries them.
"""

from __future__ import annotations

import os
import threading

ENV_VAR = "CONSERVE_BENCH_FAULTS"
POINTS = {
    "pump.next_job": "the offline pump, before it looks for the next runnable job",
    "migration.after_ddl": "a store migration, after its schema change, before the version bump",
}
# NOTE: hooks steer vLLM's engine-core process, which the suite cannot reach but by files:
# each value is the path of a `vllm_plugin.arrivals.SharedInts` the suite writes while it runs.
HOOKS = {
    "connector.abort_layer": "while the file holds L > 0, every armed step is cut at the "
                             "safepoint at (or after) layer L, the first time its work is tried",
    "kv_checkpoints.max_blocks": "while the file holds N > 0, the KV checkpoint pool holds at "
                                 "most N - 1 blocks (evicting down to it)",
    "serve.handoff_delay_ms": "while the file holds D > 0, serve hands each online request it "
                              "admits to the engine D ms late (a slow front end)",
}


class InjectedFault(RuntimeError):
    """A failure the fault suite asked for (never raised unless CONSERVE_BENCH_FAULTS is set)."""


class _Armed:
    def __init__(self, spec: str):
        self.remaining: dict[str, int | None] = {}  # point -> failures left (None: forever)
        self.values: dict[str, str] = {}  # hook -> its value
        self._lock = threading.Lock()
        for entry in filter(None, (part.strip() for part in spec.split(","))):
            name, is_hook, value = entry.partition("=")
            if is_hook:
                if name not in HOOKS:
                    raise ValueError(f"{ENV_VAR}: unknown fault hook {name!r}; "
                                     f"known: {', '.join(sorted(HOOKS))}")
                self.values[name] = value
                continue
            name, _, count = entry.partition(":")
            if name not in POINTS:
                raise ValueError(f"{ENV_VAR}: unknown fault point {name!r}; "
                                 f"known: {', '.join(sorted(POINTS))}")
            self.remaining[name] = int(count) if count else None

    def fire(self, name: str) -> bool:
        with self._lock:
            if name not in self.remaining:
                return False
            left = self.remaining[name]
            if left is not None:
                if left <= 0:
                    return False
                self.remaining[name] = left - 1
            return True


_armed = _Armed(os.environ.get(ENV_VAR, ""))


def fault_point(name: str) -> None:
    """Raise InjectedFault if the fault suite armed `name` (see the module docstring)."""
    assert name in POINTS, f"undeclared fault point {name!r}"
    if _armed.remaining and _armed.fire(name):
        raise InjectedFault(f"injected fault at {name}")


def fault_hook(name: str) -> str | None:
    """The value the fault suite gave hook `name` (`name=VALUE`), or None when it gave none.

    NOTE: read from the environment at each call (a component asks once, when it starts), so
    a process vLLM starts after the suite set the variable sees it, whether forked or spawned.
    """
    assert name in HOOKS, f"undeclared fault hook {name!r}"
    return _Armed(os.environ.get(ENV_VAR, "")).values.get(name)


def arm(spec: str) -> None:
    """Re-arm from `spec` (the variable's syntax) in this process; tests use it."""
    global _armed
    _armed = _Armed(spec)
