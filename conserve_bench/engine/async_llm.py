"""The async engine: vLLM's `AsyncLLM` (the server's engine) driven item by item.

`AsyncEngineAdapter` keeps the engine contract (`contract.ItemEngine`: submit, step,
num_pending_items, abort_all) over the `AsyncLLM` that also serves online traffic, with the
same prompt bookkeeping as the in-process engine (`contract.PromptBook`); offline requests run
at offline priority. It never touches the store.

vLLM 0.32.0 names relied on: `AsyncLLM.generate(prompt, params, request_id, priority=)`,
`AsyncLLM.abort(request_id)`, `AsyncLLM.get_tokenizer()`, `SamplingParams`,
`vllm.v1.engine.exceptions.EngineDeadError` (what `generate` raises when the engine, not
the request, failed; any other exception fails the request's items alone).
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any

from conserve_bench.engine.contract import PromptBook
from conserve_bench.engine.plugin import OFFLINE_PRIORITY
from conserve_bench.engine.prompts import Prompt


class AsyncEngineAdapter:
    """Runner-facing engine over AsyncLLM.

    Called from the pump thread; every engine call is scheduled on the server's loop.
    """

    def __init__(self, client, loop: asyncio.AbstractEventLoop, fingerprint: str,
                 max_model_len: int, on_tokens=None):
        self.client, self.loop, self.fingerprint = client, loop, fingerprint
        self.on_tokens = on_tokens or (lambda num_tokens: None)
        self._book = PromptBook(client.get_tokenizer(), max_model_len, "offline")
        self._finished: queue.Queue = queue.Queue()

    def submit(self, work: list) -> None:
        for request_id, prompt in self._book.add(work):
            asyncio.run_coroutine_threadsafe(self._generate(request_id, prompt), self.loop)

    async def _generate(self, request_id: str, prompt: Prompt) -> None:
        from vllm import SamplingParams

        final = None
        try:
            async for output in self.client.generate(
                {"prompt_token_ids": prompt.token_ids}, SamplingParams(**prompt.params),
                request_id, priority=OFFLINE_PRIORITY,
            ):
                final = output
        except BaseException as e:  # surfaced in step(), on the pump thread
            final = e
        self._finished.put((request_id, final))

    def step(self) -> list[tuple[str, Any]]:
        """Wait up to 50 ms for finished requests; (item key, result) of every finished item."""
        finished: list[tuple[str, Any]] = []
        try:
            batch = [self._finished.get(timeout=0.05)]
        except queue.Empty:
            return finished
        while not self._finished.empty():
            batch.append(self._finished.get_nowait())
        for request_id, output in batch:
            prompt = self._book.take(request_id)
            if prompt is None or output is None:
                continue  # aborted
            if isinstance(output, BaseException):
                finished += self._book.fail(prompt, _request_error(output))
                continue
            self.on_tokens(len(prompt.token_ids) + len(output.outputs[0].token_ids))
            finished += self._book.fold(prompt, output)
        return finished

    @property
    def num_pending_items(self) -> int:
        return self._book.num_pending_items

    def abort_all(self) -> None:
        if request_ids := self._book.clear():
            asyncio.run_coroutine_threadsafe(self.client.abort(request_ids), self.loop)


def _request_error(error: BaseException) -> Exception:
    """The error, if it is the request's alone; raises it if the engine itself failed."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError) or not isinstance(error, Exception):
        raise RuntimeError(f"offline request failed: {error}") from error
    return error
