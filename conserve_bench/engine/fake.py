"""A deterministic engine that keeps the engine contract (`contract.ItemEngine`) without vLLM.

For tests of what sits above an engine (the runner's window, commits and partials,
cancellation, the pump, job states, resume after a kill): results are derived from a hash of
each item's key, so every run of the same items returns the same results in the same shapes
as lm-eval's. It finishes `items_per_step` items per step, first in first out, and can fail or
stall after a given number of items, or report chosen items as failed (`ItemError`: a
poisoned request). With `gen_tokens`, generations stream fake tokens one per step and
continue from partials like the real engines. It must never be used where the real engine's
behaviour is tested.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from conserve_bench.engine.contract import ItemError, Partials

FAKE_FINGERPRINT = "fake|float32|2048|w=fake|vllm=none"


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def fake_result(key: str, kind: str) -> Any:
    """The fake result of one item: lm-eval's shape for its kind, a function of its key."""
    h = _hash(key)
    if kind == "loglikelihood":
        return [-(h % 1000) / 100, h % 3 == 0]
    if kind == "loglikelihood_rolling":
        return -(h % 10_000) / 100
    return f"fake-{h % 1000}"


def fake_token(key: str, position: int) -> int:
    """The token a fake generation of `key` streams at `position`."""
    return _hash(f"{key}:{position}") % 50_000


def fake_tokens(key: str, num_tokens: int) -> list[int]:
    return [fake_token(key, i) for i in range(num_tokens)]


def fake_text(token_ids: Sequence[int]) -> str:
    """A fake generation's text: a function of its tokens alone, like a real one's."""
    return "fake " + " ".join(map(str, token_ids))


class FakeEngineError(RuntimeError):
    pass


class FakeEngine:
    """`items_per_step` items finish per `step()`. Once `fail_after` items have finished, the
    next `step()` raises, once; once `stall_after` have, `step()` only sleeps (a process to
    kill at a known point). Items whose key is in `poisoned` finish as an `ItemError`. With
    `gen_tokens` > 0, every generate_until item in flight gains
    one token per step (like a batch of decodes) and finishes with `gen_tokens` of them."""

    def __init__(self, items_per_step: int = 4, fingerprint: str = FAKE_FINGERPRINT,
                 fail_after: int | None = None, stall_after: int | None = None,
                 step_s: float = 0.0, on_step: Callable[[], None] | None = None,
                 poisoned: Collection[str] = (), gen_tokens: int = 0):
        self.items_per_step, self.fingerprint = items_per_step, fingerprint
        self.poisoned = frozenset(poisoned)
        self.fail_after, self.stall_after, self.step_s = fail_after, stall_after, step_s
        self.on_step = on_step or (lambda: None)
        self.gen_tokens = gen_tokens
        self.num_finished = self.num_steps = self.num_generated_tokens = 0
        self.submitted: list[str] = []  # every key ever submitted, in order
        self.continued: dict[str, int] = {}  # key -> tokens its last submit continued from
        self._queue: deque = deque()
        self._generating: dict[str, list[int]] = {}  # key -> its tokens so far

    def submit(self, work: Sequence[Any], partials: Partials | None = None) -> None:
        for item in work:
            if item.kind == "generate_until" and self.gen_tokens:
                partial = list((partials or {}).get(item.key, ()))[:self.gen_tokens]
                self._generating[item.key] = partial
                self.continued[item.key] = len(partial)
            else:
                self._queue.append(item)
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
        num = min([self.items_per_step, *limits])
        finished = [self._queue.popleft() for _ in range(min(num, len(self._queue)))]
        results = [(item.key, self._result(item)) for item in finished]
        results += self._generate(num - len(results))
        self.num_finished += len(results)
        return results

    def _result(self, item) -> Any:
        if item.key in self.poisoned:
            return ItemError(f"FakeEngineError: item {item.key} is poisoned")
        return fake_result(item.key, item.kind)

    def _generate(self, max_finished: int) -> list[tuple[str, str]]:
        """One token more for every generation; up to `max_finished` complete ones finish."""
        done = []
        for key, tokens in list(self._generating.items()):
            if len(tokens) < self.gen_tokens:
                tokens.append(fake_token(key, len(tokens)))
                self.num_generated_tokens += 1
            if len(tokens) == self.gen_tokens and len(done) < max_finished:
                del self._generating[key]
                done.append((key, fake_text(tokens)))
        return done

    def partials(self) -> dict[str, list[int]]:
        return {key: list(tokens) for key, tokens in self._generating.items()
                if 0 < len(tokens) < self.gen_tokens}

    @property
    def num_pending_items(self) -> int:
        return len(self._queue) + len(self._generating)

    def abort_all(self) -> None:
        self._queue.clear()
        self._generating.clear()
