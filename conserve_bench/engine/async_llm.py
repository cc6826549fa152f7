"""The async engine: vLLM's `AsyncLLM` (the server's engine) driven item by item.

`AsyncEngineAdapter` gives the runner the in-process engine's interface (submit, step,
num_pending_items, abort_all) over the `AsyncLLM` that also serves online traffic; offline
requests run at offline priority. It never touches the store.

vLLM 0.32.0 names relied on: `AsyncLLM.generate(prompt, params, request_id, priority=)`,
`AsyncLLM.abort(request_id)`, `AsyncLLM.get_tokenizer()`, `SamplingParams`.
"""

from __future__ import annotations

import asyncio
import itertools
import queue

from conserve_bench.engine.local import OFFLINE_PRIORITY
from conserve_bench.engine.prompts import Assembler, Encoder, Prompt, build_prompts


class AsyncEngineAdapter:
    """Runner-facing engine (submit/step/num_pending_items/abort_all) over AsyncLLM.

    Called from the pump thread; every engine call is scheduled on the server's loop.
    """

    def __init__(self, client, loop: asyncio.AbstractEventLoop, fingerprint: str,
                 max_model_len: int, on_tokens=None):
        self.client, self.loop, self.fingerprint = client, loop, fingerprint
        self.encoder = Encoder(client.get_tokenizer(), max_model_len)
        self.on_tokens = on_tokens or (lambda num_tokens: None)
        self._assembler = Assembler()
        self._finished: queue.Queue = queue.Queue()
        self._inflight: dict[str, Prompt] = {}
        self._ids = itertools.count()

    def submit(self, work: list) -> None:
        prompts, num_parts = build_prompts(work, self.encoder)
        self._assembler.expect(work, num_parts)
        for prompt in prompts:
            request_id = f"offline-{next(self._ids)}"
            self._inflight[request_id] = prompt
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

    def step(self) -> list:
        finished = []
        try:
            batch = [self._finished.get(timeout=0.05)]
        except queue.Empty:
            return finished
        while not self._finished.empty():
            batch.append(self._finished.get_nowait())
        for request_id, output in batch:
            prompt = self._inflight.pop(request_id, None)
            if isinstance(output, BaseException):
                raise RuntimeError(f"offline request failed: {output}") from output
            if prompt is None or output is None:
                continue  # aborted
            self.on_tokens(len(prompt.token_ids) + len(output.outputs[0].token_ids))
            finished += self._assembler.add(prompt, output)
        return finished

    @property
    def num_pending_items(self) -> int:
        return self._assembler.num_pending

    def abort_all(self) -> None:
        request_ids = list(self._inflight)
        self._inflight.clear()
        self._assembler = Assembler()
        if request_ids:
            asyncio.run_coroutine_threadsafe(self.client.abort(request_ids), self.loop)
