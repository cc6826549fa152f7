"""The offline pump: runs queued jobs on the engine that also serves online traffic.

A thread takes the oldest queued or running job and runs it with the same `run_job` as
`submit` (lm-eval -> work items -> runner -> store), as this server's `jobs.worker.Worker`:
every replica on one store joins the same job and they share its items. Its engine is
`engine.async_llm.AsyncEngineAdapter`, over vLLM's `AsyncLLM` on the server's event loop, at
offline priority. Stopping (SIGTERM drain) admits no new work and gives in-flight items back
to pending; the other replicas carry on, and the job stays queued for the next start if none
is left. A database outage pauses the pump; it never ends it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from conserve_bench.config import RunConfig
from conserve_bench.engine.async_llm import AsyncEngineAdapter
from conserve_bench.errors import ForeignJobError, JobStateError, StoreUnavailableError
from conserve_bench.jobs.worker import Worker
from conserve_bench.store import Store

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5


class OfflinePump:
    """Runs jobs one at a time on a worker thread until stopped. `model`: the name of the
    model its engine serves; task jobs of another model are left to the replicas serving it."""

    def __init__(self, store: Store, engine: AsyncEngineAdapter, run_cfg: RunConfig,
                 output_dir: str | Path | None, on_progress=None, label: str = "serve",
                 model: str | None = None):
        self.store, self.engine, self.run_cfg, self.model = store, engine, run_cfg, model
        self.output_dir = output_dir
        self.worker = Worker(store, label)
        self.on_progress = on_progress or (lambda job_id, done, total: None)
        self._foreign: set[str] = set()  # jobs this engine must never run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_forever, name="offline-pump", daemon=True)

    def start(self) -> None:
        self.worker.start()
        self._thread.start()

    def request_stop(self) -> None:
        """Admit no new offline work (returns at once; `stop` waits for the drain)."""
        self._stop.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Admit no new offline work and wait until in-flight items are back to pending."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.worker.stop()

    def _run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self._run_next()
            except StoreUnavailableError as e:
                log.warning("offline pump paused: %s", e)
                ran = False
            if not ran:
                self._stop.wait(IDLE_POLL_S)

    def _run_next(self) -> bool:
        """Run the oldest runnable job to its end; False if there was none (or it failed)."""
        from conserve_bench.jobs.lifecycle import run_job
        from conserve_bench.jobs.runner import Stopped

        job = self.store.next_runnable_job(skip=self._foreign)
        if job is None:
            return False
        try:
            # NOTE: never retry_failed: the job may have failed (on another replica) since it
            # was picked; its failed items are retried by `resume`, not by every replica.
            run_job(self.store, job.id, self.engine, self.run_cfg, output_dir=self.output_dir,
                    on_progress=lambda d, t, _tokens, j=job.id: self.on_progress(j, d, t),
                    should_stop=self._stop.is_set, worker=self.worker, retry_failed=False,
                    model=self.model)
        except Stopped:
            log.info("offline pump stopped during job %s; its items are pending", job.id)
        except ForeignJobError as e:
            log.warning("offline pump leaves job %s to others: %s", job.id, e)
            self._foreign.add(job.id)
            return True
        except JobStateError as e:
            log.info("offline pump skips job %s: %s", job.id, e)
            return False
        except StoreUnavailableError:
            raise
        except Exception:
            if not self._stop.is_set():
                log.exception("job %s failed", job.id)
            return False
        return True
