"""A deterministic engine that keeps the engine contract (`contract.ItemEngine`) without vLLM.

For tests of what sits above an engine (the runner's window and commits, cancellation, the
pump, job states, resume after a kill): results are derived from a hash of each item's key,
so every run of the same items returns the same results in the same shapes as lm-eval's.
It finishes `items_per_step` items per step, first in first out, and can fail or stall after
a given number of items, or report chosen items as failed (`ItemError`: a poisoned request).
It must never be used where the real engine's behaviour is tested.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from conserve_bench.engine.contract import ItemError

FAKE_FINGERPRINT = "fake|float32|2048"


def fake_result(key: str, kind: str) -> Any:
    """The fake result of one item: lm-eval's shape for its kind, a function of its key."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    if kind == "loglikelihood":
        return [-(h % 1000) / 100, h % 3 == 0]
    if kind == "loglikelihood_rolling":
        return -(h % 10_000) / 100
    return f"fake-{h % 1000}"


class FakeEngineError(RuntimeError):
    pass


class FakeEngine:
    """`items_per_step` items finish per `step()`. Once `fail_after` items have finished, the
    next `step()` raises, once; once `stall_after` have, `step()` only sleeps (a process to
    kill at a known point). Items whose key is in `poisoned` finish as an `ItemError`."""

    def __init__(self, items_per_step: int = 4, fingerprint: str = FAKE_FINGERPRINT,
                 fail_after: int | None = None, stall_after: int | None = None,
                 step_s: float = 0.0, on_step: Callable[[], None] | None = None,
                 poisoned: Collection[str] = ()):
        self.items_per_step, self.fingerprint = items_per_step, fingerprint
        self.poisoned = frozenset(poisoned)
        self.fail_after, self.stall_after, self.step_s = fail_after, stall_after, step_s
        self.on_step = on_step or (lambda: None)
        self.num_finished = self.num_steps = 0
        self.submitted: list[str] = []  # every key ever submitted, in order
        self._queue: deque = deque()

    def submit(self, work: Sequence[Any]) -> None:
        self._queue.extend(work)
        self.submitted += [item.key for item in work]

    def step(self) -> list[tuple[str, Any]]:
        self.on_step()
        self.num_steps += 1
        time.sleep(self.step_s)
        if self.fail_after is not None and self.num_finished >= self.fail_after:
            self.fail_after = None  # NOTE: a transient failure; the engine works again after
            raise FakeEngineError(f"fake engine failed after {self.num_finished} items")
        if self.stall_after is not None and self.num_finished >= self.stall_after:
            time.sleep(0.05)
            return []
        limits = [n - self.num_finished for n in (self.fail_after, self.stall_after) if n is not None]
        num = min([self.items_per_step, len(self._queue), *limits])
        finished = [self._queue.popleft() for _ in range(num)]
        self.num_finished += len(finished)
        return [(item.key, self._result(item)) for item in finished]

    def _result(self, item) -> Any:
        if item.key in self.poisoned:
            return ItemError(f"FakeEngineError: item {item.key} is poisoned")
        return fake_result(item.key, item.kind)

    @property
    def num_pending_items(self) -> int:
        return len(self._queue)

    def abort_all(self) -> None:
        self._queue.clear()
