"""The offline pump: runs queued jobs on the engine that also serves online traffic.

A worker thread takes the oldest queued or running job and runs it with the same `run_job`
as `submit` (lm-eval -> work items -> runner -> store). Its engine is `AsyncEngineAdapter`,
which gives the runner the in-process engine's interface over vLLM's `AsyncLLM` on the
server's event loop, at offline priority. Stopping (SIGTERM drain) admits no new work and
gives in-flight items back to pending; the job stays queued and resumes on the next start.

vLLM 0.32.0 names relied on: `AsyncLLM.generate(prompt, params, request_id, priority=)`,
`AsyncLLM.abort(request_id)`, `AsyncLLM.get_tokenizer()`, `SamplingParams`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from pathlib import Path

from .config import RunConfig
from .engine import OFFLINE_PRIORITY
from .requests import Assembler, Encoder, Prompt, build_prompts
from .store import Store

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5


class AsyncEngineAdapter:
    """Runner-facing engine (submit/step/num_pending_items/abort_all) over AsyncLLM.

    Called from the pump thread; every engine call is scheduled on the server's loop.
    """

    def __init__(self, client, loop: asyncio.AbstractEventLoop, fingerprint: str,
                 max_model_len: int, on_tokens=None):
        self.client, self.loop, self.fingerprint = client, loop, fingerprint
        self.encoder = Encoder(client.get_tokenizer(), max_model_len - 1)
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


class OfflinePump:
    """Runs jobs one at a time on a worker thread until stopped."""

    def __init__(self, store: Store, engine: AsyncEngineAdapter, run_cfg: RunConfig,
                 output_dir: str | Path | None, on_progress=None):
        self.store, self.engine, self.run_cfg = store, engine, run_cfg
        self.output_dir = output_dir
        self.on_progress = on_progress or (lambda job_id, done, total: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_forever, name="offline-pump", daemon=True)

    def start(self) -> None:
        self.store.requeue_stale()
        self._thread.start()

    def request_stop(self) -> None:
        """Admit no new offline work (returns at once; `stop` waits for the drain)."""
        self._stop.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Admit no new offline work and wait until in-flight items are back to pending."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run_forever(self) -> None:
        from .jobs import run_job
        from .runner import Stopped

        while not self._stop.is_set():
            job = self.store.next_runnable_job()
            if job is None:
                self._stop.wait(IDLE_POLL_S)
                continue
            try:
                run_job(self.store, job.id, self.engine, self.run_cfg, output_dir=self.output_dir,
                        on_progress=lambda d, t, j=job.id: self.on_progress(j, d, t),
                        should_stop=self._stop.is_set)
            except Stopped:
                log.info("offline pump stopped during job %s; its items are pending", job.id)
            except Exception:
                if self._stop.is_set():  # the engine went down with the server: not the job's fault
                    self.store.set_job_state(job.id, "queued")
                    return
                log.exception("job %s failed", job.id)
                time.sleep(IDLE_POLL_S)
