"""The runner's engine: the contract an engine of work items keeps, and its shared bookkeeping.

`ItemEngine` is all that `jobs.runner.Runner`, `jobs.lifecycle.run_job`, `serve.pump` and the
lm-eval backend ask of an engine; `local.Engine` (vLLM in this process), `async_llm.
AsyncEngineAdapter` (the server's `AsyncLLM`) and `fake.FakeEngine` (tests) satisfy it.
`PromptBook` is the bookkeeping both vLLM engines share: request ids, the prompts in flight,
the `Assembler` folding outputs into item results. Nothing here imports vLLM or the store.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from conserve_bench.engine.prompts import Assembler, Encoder, Prompt, build_prompts


@dataclass(frozen=True)
class ItemError:
    """The result of an item the engine could not compute while the engine itself is fine
    (e.g. generation settings vLLM refuses); the runner records a failed attempt."""

    message: str


@runtime_checkable
class ItemEngine(Protocol):
    """An engine that computes work items (one lm-eval request each) a few at a time.

    - `submit(work)` takes `WorkItem`s (key, kind, args) and starts computing them; it
      never blocks on their results.
    - `step()` advances the engine (one engine step, or a short wait for results computed
      elsewhere) and returns `(item key, result)` for every item that finished, each exactly
      once and in no particular order; a result is lm-eval's (`[logprob, is_greedy]`, a
      summed rolling logprob, or generated text). It raises when the engine itself failed.
      The runner calls it only while `num_pending_items > 0`.
    - `num_pending_items`: items submitted and not yet returned by `step()`.
    - `abort_all()` drops every item in flight; none of them is returned afterwards.
    - `fingerprint`: the model and numerics that decide a result; part of every item key,
      so two engines with the same fingerprint share finished items.
    An engine never touches the store: what to submit and when to commit is the runner's.
    """

    @property
    def fingerprint(self) -> str: ...

    @property
    def num_pending_items(self) -> int: ...

    def submit(self, work: Sequence[Any]) -> None: ...

    def step(self) -> list[tuple[str, Any]]: ...

    def abort_all(self) -> None: ...


class PromptBook:
    """The prompts an engine has in flight, by request id, and the items they fold into."""

    def __init__(self, tokenizer, max_model_len: int, id_prefix: str):
        self.encoder = Encoder(tokenizer, max_model_len)
        self._prefix = id_prefix
        self._ids = itertools.count()
        self._inflight: dict[str, Prompt] = {}
        self._assembler = Assembler()

    def add(self, work: Sequence[Any]) -> list[tuple[str, Prompt]]:
        """The prompts of `work` under fresh request ids, now in flight."""
        prompts, num_parts = build_prompts(list(work), self.encoder)
        self._assembler.expect(list(work), num_parts)
        added = [(f"{self._prefix}-{next(self._ids)}", prompt) for prompt in prompts]
        self._inflight.update(added)
        return added

    def take(self, request_id: str) -> Prompt | None:
        """The prompt of a finished request, no longer in flight (None: aborted, or unknown)."""
        return self._inflight.pop(request_id, None)

    def fold(self, prompt: Prompt, output) -> list[tuple[str, Any]]:
        """(key, result) of every item that `output` (of `prompt`) completes."""
        return self._assembler.add(prompt, output)

    def fail(self, prompt: Prompt, error: BaseException) -> list[tuple[str, Any]]:
        """(key, ItemError) of every item `prompt` was part of; their other prompts' outputs
        are dropped when they come."""
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        return [(key, ItemError(message)) for key in self._assembler.drop(prompt)]

    def clear(self) -> list[str]:
        """Forget everything in flight; returns the request ids to abort in the engine."""
        request_ids = list(self._inflight)
        self._inflight.clear()
        self._assembler = Assembler()
        return request_ids

    @property
    def num_pending_items(self) -> int:
        return self._assembler.num_pending
