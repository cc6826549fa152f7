"""The runner's engine: the contract an engine of work items keeps, and its shared bookkeeping.

`ItemEngine` is all that `jobs.runner.Runner`, `jobs.lifecycle.run_job`, `serve.pump` and the
lm-eval backend ask of an engine; `local.Engine` (vLLM in this process), `async_llm.
AsyncEngineAdapter` (the server's `AsyncLLM`) and `fake.FakeEngine` (tests) satisfy it.
`PromptBook` is the bookkeeping both vLLM engines share: request ids, the prompts in flight,
the generations they stream, the `Assembler` folding outputs into item results. Nothing here
imports vLLM or the store.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from conserve_bench.engine.generation import Generation, is_resumable
from conserve_bench.engine.prompts import Assembler, Encoder, Prompt, build_prompts
from conserve_bench.errors import one_line_error

Partials = Mapping[str, Sequence[int]]  # item key -> the tokens its generation has so far


@dataclass(frozen=True)
class ItemError:
    """The result of an item the engine could not compute while the engine itself is fine
    (e.g. generation settings vLLM refuses); the runner records a failed attempt."""

    message: str


@runtime_checkable
class ItemEngine(Protocol):
    """An engine that computes work items (one lm-eval request each) a few at a time.

    - `submit(work, partials)` takes `WorkItem`s (key, kind, args) and starts computing them;
      it never blocks on their results. A `generate_until` item in `partials` continues after
      the tokens an earlier run generated (and ends with the text of one uninterrupted run).
    - `step()` advances the engine (one engine step, or a short wait for results computed
      elsewhere) and returns `(item key, result)` for every item that finished, each exactly
      once and in no particular order; a result is lm-eval's (`[logprob, is_greedy]`, a
      summed rolling logprob, or generated text). It raises when the engine itself failed.
      The runner calls it only while `num_pending_items > 0`.
    - `num_pending_items`: items submitted and not yet returned by `step()`.
    - `partials()`: the tokens generated so far (those it continued from included) by each
      unfinished `generate_until` item that can continue from them (`is_resumable`); a copy,
      for the runner to save (as partials).
    - `num_generated_tokens`: tokens generated for items since the engine started (not
      counting those they continued from).
    - `abort_all()` drops every item in flight; none of them is returned afterwards.
    - `fingerprint`: the model and numerics that decide a result; part of every item key,
      so two engines with the same fingerprint share finished items.
    An engine never touches the store: what to submit and when to commit is the runner's.
    """

    @property
    def fingerprint(self) -> str: ...

    @property
    def num_pending_items(self) -> int: ...

    @property
    def num_generated_tokens(self) -> int: ...

    def submit(self, work: Sequence[Any], partials: Partials | None = None) -> None: ...

    def step(self) -> list[tuple[str, Any]]: ...

    def partials(self) -> dict[str, list[int]]: ...

    def abort_all(self) -> None: ...


class PromptBook:
    """The prompts an engine has in flight, by request id, the items they fold into, and the
    generations they stream (`generation.Generation`).

    NOTE: the async engine streams tokens into generations on the server's event loop while
    the runner reads `partials()` on its own thread. Under `_lock`, a finished request's
    tokens arrive together with its end, so `partials()` never copies them: they may end with
    the EOS token, which a partial must never hold.
    """

    def __init__(self, tokenizer, max_model_len: int, id_prefix: str, add_bos_token: bool = False):
        self.encoder = Encoder(tokenizer, max_model_len, add_bos_token)
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
        self._prefix = id_prefix
        self._ids = itertools.count()
        self._inflight: dict[str, Prompt] = {}
        self._generations: dict[str, Generation] = {}  # request id -> its generation
        self._ready: list[tuple[str, Any]] = []  # items their partial alone completes
        self._assembler = Assembler()
        self._lock = threading.Lock()
        self.num_generated_tokens = 0

    def add(self, work: Sequence[Any], partials: Partials | None = None) -> list[tuple[str, Prompt]]:
        """The prompts of `work` under fresh request ids, now in flight. A generation in
        `partials` continues after its tokens, or is ready at once if they already end it."""
        prompts, num_parts = build_prompts(list(work), self.encoder)
        self._assembler.expect(list(work), num_parts)
        added = []
        for prompt in prompts:
            generation = self._generation(prompt, partials or {})
            if generation is not None and generation.is_complete():
                self._ready += self._assembler.add(prompt, generation)
                continue
            request_id = f"{self._prefix}-{next(self._ids)}"
            if generation is not None:
                prompt = Prompt(*generation.continued(prompt.token_ids, prompt.params), prompt.parts)
            with self._lock:
                self._inflight[request_id] = prompt
                if generation is not None:
                    self._generations[request_id] = generation
            added.append((request_id, prompt))
        return added

    def _generation(self, prompt: Prompt, partials: Partials) -> Generation | None:
        if not prompt.generates:
            return None
        (part,) = prompt.parts
        partial = partials.get(part.key, ()) if is_resumable(prompt.params) else ()
        return Generation.start(part.key, part.until, prompt.params["max_tokens"], self._decode,
                                partial, prompt.params.get("stop_token_ids") or ())

    def extend(self, request_id: str, token_ids: Sequence[int], finished: bool) -> bool:
        """Add a request's newly generated tokens to its generation; True when the request
        must stop here though the engine goes on (a stop string across its partial's end)."""
        with self._lock:
            generation = self._generations.get(request_id)
            if generation is None:
                return False
            self.num_generated_tokens += len(token_ids)
            stop = generation.extend(token_ids)
            generation.finished = finished or stop
        return stop

    def finish(self, request_id: str, output) -> list[tuple[str, Any]] | None:
        """(key, result) of every item that the finished request completes; None when the
        request is no longer in flight (aborted)."""
        with self._lock:
            prompt = self._inflight.pop(request_id, None)
            generation = self._generations.pop(request_id, None)
        if prompt is None:
            return None
        return self._assembler.add(prompt, output if generation is None else generation)

    def in_flight(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._inflight

    def fail(self, request_id: str, error: BaseException) -> list[tuple[str, Any]]:
        """(key, ItemError) of every item the request was part of, no longer in flight; their
        other prompts' outputs are dropped when they come. None of it if it was aborted."""
        with self._lock:
            prompt = self._inflight.pop(request_id, None)
            self._generations.pop(request_id, None)
        if prompt is None:
            return []
        return [(key, ItemError(one_line_error(error))) for key in self._assembler.drop(prompt)]

    def take_ready(self) -> list[tuple[str, Any]]:
        """Items finished without the engine (their partial ended them), once each."""
        ready, self._ready = self._ready, []
        return ready

    def partials(self) -> dict[str, list[int]]:
        with self._lock:
            return {g.key: list(g.token_ids) for request_id, g in self._generations.items()
                    if g.token_ids and not g.finished
                    and is_resumable(self._inflight[request_id].params)}

    def clear(self) -> list[str]:
        """Forget everything in flight; returns the request ids to abort in the engine."""
        with self._lock:
            request_ids = list(self._inflight)
            self._inflight.clear()
            self._generations.clear()
        self._ready = []
        self._assembler = Assembler()
        return request_ids

    @property
    def num_pending_items(self) -> int:
        return self._assembler.num_pending + len(self._ready)
