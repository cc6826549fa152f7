"""The offline pump: runs queued jobs on the engine that also serves online traffic.

A worker thread takes the oldest queued or running job and runs it with the same `run_job`
as `submit` (lm-eval -> work items -> runner -> store). Its engine is
`engine.async_llm.AsyncEngineAdapter`, over vLLM's `AsyncLLM` on the server's event loop, at
offline priority. Stopping (SIGTERM drain) admits no new work and gives in-flight items back
to pending; the job stays queued and resumes on the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from conserve_bench.config import RunConfig
from conserve_bench.engine.async_llm import AsyncEngineAdapter
from conserve_bench.store import JobState, Store

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5


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
        from conserve_bench.jobs.lifecycle import run_job
        from conserve_bench.jobs.runner import Stopped

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
                    self.store.set_job_state(job.id, JobState.QUEUED)
                    return
                log.exception("job %s failed", job.id)
                time.sleep(IDLE_POLL_S)
