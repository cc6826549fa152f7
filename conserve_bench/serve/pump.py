"""The offline pump: runs queued jobs on the engine that also serves online traffic.

A thread takes the oldest queued or running job and runs it with the same `run_job` as
`submit` (lm-eval -> work items -> runner -> store), as this server's `jobs.replica.Replica`
(an OpenAI batch's job runs its lines on `batch_engine`, vLLM's OpenAI handlers: `batches`):
every replica on one store joins the same job and they share its items. Its engine is
`engine.async_llm.AsyncEngineAdapter`, over vLLM's `AsyncLLM` on the server's event loop, at
offline priority. Stopping (SIGTERM drain) admits no new work and gives in-flight items back
to pending; the other replicas carry on, and the job stays queued for the next start if none
is left. No error ends the pump but a dead engine: a database outage or any other failure
is logged and retried with capped exponential backoff (`health()` turns bad once it has
lasted a lease). A dead engine gives the job back (never failed), and the pump stops for good
(`fatal`, `on_fatal`), so that the server exits non-zero for a supervisor to restart it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conserve_bench.config import RunConfig
from conserve_bench.engine.async_llm import AsyncEngineAdapter
from conserve_bench.errors import (EngineUnavailableError, ForeignJobError, JobStateError,
                                   StoreUnavailableError, first_line, one_line_error)
from conserve_bench.faults import fault_point
from conserve_bench.jobs.replica import Backoff, Replica
from conserve_bench.store import Job, Store

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 5.0  # backoff after a failed turn of the loop


class OfflinePump:
    """Runs jobs one at a time on a thread of its own until stopped. `model`: the name of the
    model its engine serves; task jobs of another model are left to the replicas serving it.
    `on_fatal(reason)` is called (on the pump's thread) once, if the pump stops for good.
    `include_paths`: folders of task YAML its jobs may name (`serve --include-path`)."""

    def __init__(self, store: Store, engine: AsyncEngineAdapter, run_cfg: RunConfig,
                 output_dir: str | Path | None, on_progress=None, label: str = "serve",
                 model: str | None = None, on_fatal: Callable[[str], None] | None = None,
                 include_paths: tuple[str, ...] = (), batch_engine=None,
                 batch_run_cfg: RunConfig | None = None):
        self.store, self.engine, self.run_cfg, self.model = store, engine, run_cfg, model
        self.batch_engine, self.batch_run_cfg = batch_engine, batch_run_cfg or run_cfg
        self.output_dir, self.include_paths = output_dir, include_paths
        self.replica = Replica(store, label)
        self.on_progress = on_progress or (lambda job_id, done, total: None)
        self.on_fatal = on_fatal or (lambda reason: None)
        self._foreign: set[str] = set()  # jobs this engine must never run
        self._fatal: str | None = None
        self._failing_since: float | None = None  # monotonic: the first failure in a row
        self._last_error: str | None = None
        self._backoff = Backoff(RETRY_FIRST_S, RETRY_MAX_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_forever, name="offline-pump", daemon=True)

    def start(self) -> None:
        self.replica.start()
        self._thread.start()

    def request_stop(self) -> None:
        """Admit no new offline work (returns at once; `stop` waits for the drain)."""
        self._stop.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Admit no new offline work and wait until in-flight items are back to pending."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            self.replica.stop()
        except StoreUnavailableError as e:  # NOTE: its leases expire; the others reclaim
            log.warning("offline pump stopped without giving its items back: %s", first_line(e))

    @property
    def fatal(self) -> str | None:
        """Why the pump stopped for good (the engine died, or its thread did); None while it
        runs, or after a requested stop."""
        return self._fatal

    def health(self) -> tuple[bool, str | None]:
        """(True, None) while the pump can run jobs; else (False, why): it stopped for good
        (`fatal`), its thread died, the engine is dead, or every turn of its loop has failed
        for longer than a lease (e.g. the store is down)."""
        if self._fatal is not None:
            return False, self._fatal
        started = self._thread.ident is not None
        if started and not self._thread.is_alive() and not self._stop.is_set():
            return False, "the offline pump's thread died"
        if self._engine_is_dead():
            return False, "the server's engine died"
        since, lease_s = self._failing_since, self.store.leases.lease_s
        if since is not None and (failing_s := time.monotonic() - since) > lease_s:
            return False, (f"the offline pump has failed for {failing_s:.1f} s (lease "
                           f"{lease_s:g} s): {self._last_error}")
        return True, None

    def _engine_is_dead(self) -> bool:
        # NOTE: only the async engine can tell (`AsyncEngineAdapter.is_dead`); others raise
        # EngineUnavailableError from `step` alone.
        return any(getattr(engine, "is_dead", False) is True for engine in (self.engine, self.batch_engine))

    def _run_forever(self) -> None:
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._stop.wait(self._turn())
        except BaseException as e:  # NOTE: never a silent death: health() must say
            self._go_down(f"the offline pump's thread died: {one_line_error(e)}")
            raise

    def _turn(self) -> float:
        """One turn of the loop; returns how long to wait before the next."""
        try:
            if self._engine_is_dead():
                raise EngineUnavailableError("the server's engine died")
            fault_point("pump.next_job")
            ran = self._run_next()
        except EngineUnavailableError as e:
            if not self._stop.is_set():  # NOTE: else the engine went down with the server
                self._go_down(f"the server's engine is unavailable: {first_line(e)}")
            return 0.0
        except Exception as e:
            return self._failed(e)
        self._failing_since = None
        self._backoff.reset()
        return 0.0 if ran else IDLE_POLL_S

    def _failed(self, error: Exception) -> float:
        """Log a failed turn (called in its `except`); returns the backoff before the next."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._last_error = one_line_error(error)
        delay_s = self._backoff.next()
        if isinstance(error, StoreUnavailableError):
            log.warning("offline pump paused, retrying in %.1f s: %s", delay_s, first_line(error))
        else:
            log.exception("offline pump failed, retrying in %.1f s", delay_s)
        return delay_s

    def _go_down(self, reason: str) -> None:
        """Stop for good: no job is taken any more; the server should exit non-zero."""
        if self._fatal is not None:
            return
        self._fatal = reason
        log.error("offline pump down: %s", reason)
        try:
            self.on_fatal(reason)
        except Exception:
            log.exception("on_fatal failed")

    def _run_next(self) -> bool:
        """Run the oldest runnable job to its end; False if there was none (or it failed).
        Raises what must not be blamed on a job: a dead engine, a store outage."""
        job = self.store.next_runnable_job(skip=self._foreign)
        if job is None:
            return False
        try:
            self._run(job)
        except ForeignJobError as e:
            log.warning("offline pump leaves job %s to others: %s", job.id, e)
            self._foreign.add(job.id)
        except JobStateError as e:
            log.info("offline pump skips job %s: %s", job.id, e)
            return False
        except (EngineUnavailableError, StoreUnavailableError):
            raise
        except Exception:
            if not self._stop.is_set():
                log.exception("job %s failed", job.id)
            return False
        return True

    def _run(self, job: Job) -> None:
        from conserve_bench.jobs.lifecycle import run_job
        from conserve_bench.jobs.runner import Stopped

        batch = job.spec.source == "batch"
        engine = self.batch_engine if batch else self.engine
        if engine is None:
            raise ForeignJobError(f"job {job.id} is an OpenAI batch; this replica runs none")
        try:
            # NOTE: never retry_failed: the job may have failed (on another replica) since it
            # was picked; its failed items are retried by `resume`, not by every replica.
            run_job(self.store, job.id, engine, self.batch_run_cfg if batch else self.run_cfg,
                    output_dir=self.output_dir,
                    on_progress=lambda d, t, _tokens, j=job.id: self.on_progress(j, d, t),
                    should_stop=self._stop.is_set, replica=self.replica, retry_failed=False,
                    model=self.model, include_paths=self.include_paths)
        except Stopped:
            log.info("offline pump stopped during job %s; its items are pending", job.id)
