"""Fault injection: named points where the fault suite makes the product fail on purpose.

A point is armed only by the environment variable `CONSERVE_BENCH_FAULTS`, which the fault
suite (tests, `benchmarks/faults.py`) sets on a process it starts, never the product itself:
a comma-separated list of `point` (fail every time) or `point:N` (fail the first N times).
`fault_point(name)` raises `InjectedFault` where its point is armed; unarmed, it costs one
dict lookup. Every point the code can raise at is listed in POINTS, so a typo fails loudly.
"""

from __future__ import annotations

import os
import threading

ENV_VAR = "CONSERVE_BENCH_FAULTS"
POINTS = {
    "pump.next_job": "the offline pump, before it looks for the next runnable job",
    "migration.after_ddl": "a store migration, after its schema change, before the version bump",
}


class InjectedFault(RuntimeError):
    """A failure the fault suite asked for (never raised unless CONSERVE_BENCH_FAULTS is set)."""


class _Armed:
    def __init__(self, spec: str):
        self.remaining: dict[str, int | None] = {}  # point -> failures left (None: forever)
        self._lock = threading.Lock()
        for entry in filter(None, (part.strip() for part in spec.split(","))):
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


def arm(spec: str) -> None:
    """Re-arm from `spec` (the variable's syntax) in this process; tests use it."""
    global _armed
    _armed = _Armed(spec)
