"""The session an lm-eval run opens in this process (`--model conserve`): one job, its runner
and its engine.

`open_session` opens the store, starts the engine (`engine.local.start_engine`) unless one is
given, and records a running job whose items `ConserveLM` adds as lm-eval hands it requests;
`Session.close` finishes that job and stops the engine it started. It never computes a
result: the runner and the engine do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from conserve_bench.config import JobSpec, ModelOptions, RunConfig, default_db_url
from conserve_bench.engine import local as local_engine
from conserve_bench.engine.models import resolve_model
from conserve_bench.jobs.results import with_metadata
from conserve_bench.jobs.runner import Runner
from conserve_bench.jobs.replica import Replica
from conserve_bench.store import Job, JobState, Store


@dataclass
class Session:
    """An lm-eval run in this process: one job of requests, its runner, and its engine."""

    store: Store
    engine: Any
    runner: Runner
    job_id: str
    replica: Replica
    owns_engine: bool = True
    closed: bool = False
    t0: float = field(default_factory=time.perf_counter)

    def close(self) -> Job:
        """Give back held items, finish the job and stop the engine this session started.

        The job ends done when every request it got has a result, cancelled otherwise; either
        way its finished items stay in the store for the next run to reuse.
        """
        if not self.closed:
            self.closed = True
            try:
                self.runner.release()
                self._finish_job()
                self.store.leave_job(self.job_id, self.replica.id)
                self.replica.stop()
            finally:
                if self.owns_engine:
                    self.engine.close()
        return self.store.get_job(self.job_id)

    def _finish_job(self) -> None:
        wall_s = time.perf_counter() - self.t0
        self.store.add_run_time(self.job_id, wall_s)
        job = self.store.get_job(self.job_id)
        if job.state == JobState.RUNNING and job.num_done == job.num_total:
            results = with_metadata({"results": {}}, self.store, job, self.engine, self.runner,
                                    wall_s)
            self.store.save_results(self.job_id, results)
        elif job.state == JobState.RUNNING:
            self.store.set_job_state(self.job_id, JobState.CANCELLED, only_from=[JobState.RUNNING], error=(
                f"the lm-eval run ended with {job.num_done}/{job.num_total} requests computed"))


def open_session(model: str, db: str | None, data_dir: str | None, run_cfg: RunConfig,
                 engine=None, options: ModelOptions | None = None) -> Session:
    """Open a store, start `model` loaded as `options` say (lm-eval `vllm`'s model_args:
    dtype, max_model_len, ...), unless an engine is given, and record a running job whose
    work items the caller (`ConserveLM`) adds as lm-eval hands it requests."""
    options = options or ModelOptions()
    store = Store(db or default_db_url())
    owns_engine = engine is None
    engine = engine or local_engine.start_engine(resolve_model(model), options=options)
    spec = JobSpec(tasks=("lm-eval",), model=model, data_dir=data_dir, source="session",
                   fingerprint=engine.fingerprint, model_options=options)
    job = store.create_job(spec)
    # NOTE: items a killed earlier run held are reclaimed by this run's claims (at once if
    # it ran on this host: the replica's start ends a dead neighbour's lease).
    replica = Replica(store, "lm-eval").start()
    store.start_job(job.id, replica.id)
    runner = Runner(store, engine, run_cfg, replica=replica)
    return Session(store, engine, runner, job.id, replica, owns_engine)
