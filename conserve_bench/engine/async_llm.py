"""The async engine: vLLM's `AsyncLLM` (the server's engine) driven item by item.

`AsyncEngineAdapter` keeps the engine contract (`contract.ItemEngine`: submit, step, partials,
num_pending_items, abort_all) over the `AsyncLLM` that also serves online traffic, with the
same prompt bookkeeping as the in-process engine (`contract.PromptBook`); offline requests run
at offline priority, and generations stream their tokens into the book as they come. It never
touches the store. An engine that died (its engine-core process gone) is never a request's
failure: `submit` and `step` raise `errors.EngineUnavailableError`, and `is_dead` says so, so
that the job is given back, never failed, and the server can exit for a supervisor to restart.

vLLM names relied on: docs/vllm-contract.md#async-engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from typing import Any

from conserve_bench.engine.contract import Partials, PromptBook
from conserve_bench.engine.local import new_tokens, sampling_params
from conserve_bench.engine.prompts import Prompt
from conserve_bench.errors import EngineUnavailableError, one_line_error
from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY


class AsyncEngineAdapter:
    """Runner-facing engine over AsyncLLM.

    Called from the pump thread; every engine call is scheduled on the server's loop.
    """

    def __init__(self, client, loop: asyncio.AbstractEventLoop, fingerprint: str,
                 max_model_len: int, on_tokens=None, add_bos_token: bool = False):
        self.client, self.loop, self.fingerprint = client, loop, fingerprint
        self.on_tokens = on_tokens or (lambda num_tokens: None)
        self._book = PromptBook(client.get_tokenizer(), max_model_len, "offline", add_bos_token)
        self._finished: queue.Queue = queue.Queue()

    @property
    def is_dead(self) -> bool:
        """The engine died (`AsyncLLM.errored`) or the server's loop is closed: nothing
        submitted will ever finish."""
        return self.loop.is_closed() or getattr(self.client, "errored", False) is True

    def _raise_if_dead(self) -> None:
        if self.is_dead:
            raise EngineUnavailableError("the server's engine died; its offline work goes back "
                                         "to pending for a restarted server")

    def submit(self, work: list, partials: Partials | None = None) -> None:
        self._raise_if_dead()
        for request_id, prompt in self._book.add(work, partials):
            asyncio.run_coroutine_threadsafe(self._generate(request_id, prompt), self.loop)

    async def _generate(self, request_id: str, prompt: Prompt) -> None:
        final, num_tokens = None, len(prompt.token_ids)
        try:
            stream = self.client.generate({"prompt_token_ids": prompt.token_ids},
                                          sampling_params(prompt), request_id,
                                          priority=OFFLINE_PRIORITY)
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    final, token_ids = output, new_tokens(output)
                    num_tokens += len(token_ids)
                    if self._book.extend(request_id, token_ids, output.finished):
                        break  # NOTE: closing the stream aborts the request in vLLM
        except BaseException as e:  # surfaced in step(), on the pump thread
            final = e
        self._finished.put((request_id, final, num_tokens))

    def step(self) -> list[tuple[str, Any]]:
        """Wait up to 50 ms for finished requests; (item key, result) of every finished item."""
        finished = self._book.take_ready()
        try:
            batch = [self._finished.get(block=not finished, timeout=0.05)]
        except queue.Empty:
            self._raise_if_dead()  # NOTE: a dead engine may never answer its requests
            return finished
        while not self._finished.empty():
            batch.append(self._finished.get_nowait())
        for request_id, output, num_tokens in batch:
            if isinstance(output, BaseException):
                if self._book.in_flight(request_id):  # else aborted
                    finished += self._book.fail(request_id, _request_error(output))
                continue
            results = None if output is None else self._book.finish(request_id, output)
            if results is not None:  # else aborted
                self.on_tokens(num_tokens)
                finished += results
        return finished

    def partials(self) -> dict[str, list[int]]:
        return self._book.partials()

    @property
    def num_pending_items(self) -> int:
        return self._book.num_pending_items

    @property
    def num_generated_tokens(self) -> int:
        return self._book.num_generated_tokens

    def abort_all(self) -> None:
        request_ids = self._book.clear()
        if request_ids and not self.is_dead:  # NOTE: a dead engine has nothing left to abort
            asyncio.run_coroutine_threadsafe(self.client.abort(request_ids), self.loop)


def _request_error(error: BaseException) -> Exception:
    """The error, if it is the request's alone; raises EngineUnavailableError if the engine
    itself failed (or the server's loop cancelled the request as it shut down)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError) or not isinstance(error, Exception):
        reason = one_line_error(error)
        raise EngineUnavailableError(f"the server's engine died: {reason}") from error
    return error
