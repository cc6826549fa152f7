"""Job lifecycle: submit, run, resume, cancel; results out in lm-eval's layout
(`results/<model>/results_<date>.json`, and `results/<job-id>.json` by job id: `jobs.results`).

The one data path: task spec -> lm-eval instances (lm-eval builds them) -> work items in the
store (`ConserveLM`) -> engine -> results committed -> lm-eval metrics -> results file.
Every function here validates its input before writing anything, and an interrupted run
gives its in-flight items back, so stored progress is never lost. Every run is a replica of
the store's fleet (`jobs.replica`): several processes may run one job together. A job fails
only for its own errors: one interrupted by infrastructure (a stop, a dead engine, a store
outage) goes back to queued, for this or another replica to run again.

    >>> store = Store("sqlite:///conserve.db")
    >>> job = submit_job(store, JobSpec(tasks=("mmlu_anatomy",), limit=10))
    >>> results = run_job(store, job.id, start_engine(resolve_model("smollm2-135m"), job.spec.model_options))

Engines are made by `engine.local.start_engine`, loaded as the job's `ModelOptions` say; the lm-eval session that `--model conserve`
opens in its own process is `harness.session`'s. This module imports only the plain lm-eval
adapter (`harness.lm.ConserveLM`), to run a job's tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conserve_bench.config import JobSpec, RunConfig, is_legacy_fingerprint
from conserve_bench.errors import (EngineUnavailableError, ForeignJobError, InvalidRequestError,
                                   JobStateError, StoreUnavailableError, first_line,
                                   one_line_error)
from conserve_bench.engine.models import model_name, resolve_model
from conserve_bench.engine.prompts import check_request_args
from conserve_bench.jobs.genkwargs import check_gen_kwargs
from conserve_bench.jobs.results import with_metadata, write_results
from conserve_bench.jobs.runner import Runner, Stopped
from conserve_bench.jobs.samples import PER_SAMPLE_KEY, read_samples_file, samples_path
from conserve_bench.jobs.replica import Replica
from conserve_bench.store import Job, JobState, Store, keyed_items
from conserve_bench.jobs.taskspec import check_tasks, task_manager

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, int], None]  # (num_done, num_total, num_generated_tokens)


def submit_job(store: Store, spec: JobSpec, run_key: str | None = None, *,
               allow_paths: bool = True, include_paths: tuple[str, ...] = ()) -> Job:
    """Validate a spec (tasks, generation arguments, data directory, model) and record a
    queued job. Tasks are names of lm-eval's index (plus the folders `include_paths`), or
    task YAML files by path unless `allow_paths` is False (the job API).

    With a `run_key` a job already holds, that job is answered (in whatever state), so a rerun
    re-attaches to it; a different spec under the same key is a JobStateError.
    """
    check_gen_kwargs(spec.gen_kwargs)
    check_tasks(spec.tasks, task_manager(spec.data_dir, include_paths), allow_paths=allow_paths)
    resolve_model(spec.model)
    job = store.create_job(spec, run_key)
    if job.spec != spec:
        raise JobStateError(f"run key {run_key!r} belongs to job {job.id}, of another spec "
                            f"({', '.join(job.spec.tasks)}); use a new key")
    return job


def run_job(store: Store, job_id: str, engine, run_cfg: RunConfig = RunConfig(),
            output_dir: str | Path | None = "results",
            on_progress: ProgressFn | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            replica: Replica | None = None, retry_failed: bool = True,
            model: str | None = None, include_paths: tuple[str, ...] = (),
            log_samples: bool = False) -> dict[str, Any]:
    """Run a job to completion on `engine`; returns lm-eval's results plus job metadata,
    written into `output_dir` (None: nowhere) in lm-eval's layout (`results.write_results`),
    with lm-eval's sample files too if `log_samples` (its `--log_samples`).

    Finished items are reused and other replicas' expired leases reclaimed; any number of
    processes may run the same job at once, as `replica`s of a fleet (None: this call is
    one). A failed job is given its failed items back, unless `retry_failed` is False (then
    it is a JobStateError). On any interruption the items this run holds go back to pending.
    A job `engine` must not run (`check_runs_on`; `model`: the model it serves) is a
    ForeignJobError. `include_paths`: folders of task YAML whose tasks the job may name.
    """
    job = runnable_job(store, job_id)
    check_runs_on(job, engine.fingerprint, model)
    manager = None
    if job.spec.source == "tasks":
        manager = task_manager(job.spec.data_dir, include_paths)
        # NOTE: paths stay allowed: only a local caller stores one (`submit_job`), and a name
        # from the job API never looks like one, so it loads from the index or not at all.
        check_tasks(job.spec.tasks, manager, allow_paths=True)
    with contextlib.ExitStack() as stack:
        if replica is None:
            replica = stack.enter_context(Replica(store, "submit"))
        return _run_as(store, job, engine, run_cfg, output_dir, on_progress, should_stop,
                       replica, manager, retry_failed, log_samples)


def _run_as(store: Store, job: Job, engine, run_cfg: RunConfig, output_dir, on_progress,
            should_stop, replica: Replica, manager, retry_failed: bool,
            log_samples: bool) -> dict[str, Any]:
    if job.state == JobState.FAILED and retry_failed:
        store.retry_failed_items(job.id)
    if not store.start_job(job.id, replica.id, failed_too=retry_failed):
        raise JobStateError(f"job {job.id} is {store.get_job_state(job.id)}; nothing to run")
    tracker = _ProgressTracker(store, job.id, on_progress)
    runner = Runner(store, engine, run_cfg, replica=replica, on_progress=tracker.advance,
                    should_stop=lambda: should_stop() or _cancelled(store, job.id),
                    on_tokens=tracker.add_tokens)
    t0 = time.perf_counter()
    try:
        output = _evaluate(store, job, runner, engine, manager, tracker)
    except BaseException as e:
        failed = _is_jobs_fault(e, engine) and not should_stop()
        _leave_interrupted(store, job, replica, runner, time.perf_counter() - t0, e, failed)
        raise
    wall_s = time.perf_counter() - t0
    store.add_run_time(job.id, wall_s)
    # NOTE: the state and the results in one write (`save_results`): a job seen done (by
    # another replica's job API too) always has its results
    done = dataclasses.replace(store.get_job(job.id), state=JobState.DONE)
    results = with_metadata(output, store, done, engine, runner, wall_s)
    saved = store.save_results(job.id, results)
    store.leave_job(job.id, replica.id)
    if not saved:  # NOTE: cancelled as it finished: the cancel stands, no results
        raise JobStateError(f"job {job.id} was cancelled; its results were not saved")
    if output_dir is not None and job.spec.source != "batch":  # NOTE: a batch's are its files
        write_results(results, output_dir, output.get("samples") if log_samples else None)
    return results


# NOTE: infrastructure, never the job's fault: the job goes back to queued (and its items to
# pending) for this or another replica, instead of failing.
INTERRUPTIONS = (Stopped, EngineUnavailableError, StoreUnavailableError)


def _is_jobs_fault(error: BaseException, engine) -> bool:
    """Whether `error` fails the job: an Exception that is not an interruption (a stop, a
    cancel, a dead engine, a store outage). Whatever ended the run while the engine was dead
    (`is_dead`, where the engine says) is the engine's death, however it surfaced."""
    if not isinstance(error, Exception) or isinstance(error, (JobCancelled, *INTERRUPTIONS)):
        return False
    return getattr(engine, "is_dead", False) is not True


def _leave_interrupted(store: Store, job: Job, replica: Replica, runner: Runner, run_s: float,
                       error: BaseException, failed: bool) -> None:
    """Give back what the run holds and leave the job (failed, or queued for the next run).

    NOTE: a store outage here must not hide `error`: what stays leased to this replica is
    untracked now, so it expires for the others, and the replica's next run gives it back.
    A job others still work on stays theirs, running.
    """
    try:
        runner.release()
        store.add_run_time(job.id, run_s)
        store.leave_job(job.id, replica.id, JobState.FAILED if failed else JobState.QUEUED,
                        error=one_line_error(error))
    except StoreUnavailableError as e:
        log.warning("job %s: could not give its items back: %s", job.id, first_line(e))


def check_runs_on(job: Job, fingerprint: str | None = None, model: str | None = None) -> None:
    """Raise ForeignJobError unless an engine of `fingerprint`, serving `model` (each checked
    when given), may compute the job's items: a session's run only in its own process,
    requests only on the engine their keys were built for (another model's results under
    those keys would be reused as theirs), and tasks only on their model (its name is on the
    results). Requests keyed before fingerprints named the weights and vLLM run nowhere."""
    spec = job.spec
    legacy = spec.fingerprint is not None and is_legacy_fingerprint(spec.fingerprint)
    if spec.source == "session":
        reuse = ("its requests, keyed by an older conserve-bench, are computed again" if legacy
                 else "its finished requests are reused")
        raise ForeignJobError(f"job {job.id} is an lm-eval run's (--model conserve) and runs in "
                              f"that process; rerun it there: {reuse}")
    if legacy:
        raise ForeignJobError(f"job {job.id} holds requests for {spec.fingerprint}, keyed by an "
                              "older conserve-bench before keys named the weights and vLLM: no "
                              "engine runs it now; run its lm-eval evaluation again")
    if model is not None and spec.source in ("tasks", "batch") and model_name(spec.model) != model:
        raise ForeignJobError(f"job {job.id} evaluates {spec.model}, not this engine's {model}")
    if None not in (fingerprint, spec.fingerprint) and spec.fingerprint != fingerprint:
        raise ForeignJobError(f"job {job.id} holds requests for {spec.fingerprint}, "
                              f"not this engine's {fingerprint}")


def runnable_job(store: Store, job_id: str) -> Job:
    """The job, if it can still run; raises JobStateError for done or cancelled jobs."""
    job = store.get_job(job_id)
    if job.state in (JobState.DONE, JobState.CANCELLED):
        raise JobStateError(f"job {job_id} is {job.state}; nothing to run")
    return job


class JobCancelled(Exception):
    pass


def _cancelled(store: Store, job_id: str) -> bool:
    return store.get_job_state(job_id) == JobState.CANCELLED


def _raise_if_cancelled(store: Store, job_id: str) -> None:
    if _cancelled(store, job_id):
        raise JobCancelled(f"job {job_id} was cancelled")


def _evaluate(store, job: Job, runner, engine, manager, tracker) -> dict[str, Any]:
    if job.spec.source == "batch":
        from conserve_bench.batches.lifecycle import run_batch

        tracker.refresh()
        return run_batch(store, job, runner)
    if job.spec.source != "tasks":
        return _compute_requests(store, job, runner, tracker)
    from lm_eval import simple_evaluate

    from conserve_bench.harness.lm import ConserveLM

    spec = job.spec
    lm = ConserveLM.for_job(store, runner, job.id, engine.fingerprint,
                            on_kind=lambda kind, num_items: tracker.refresh(),
                            engine=engine, model=spec.model)
    if isinstance(spec.apply_chat_template, str):
        lm.chat_template(spec.apply_chat_template)  # a name lm-eval would not render with: refused
    # NOTE: log_samples for the per-document metric values (`samples.sample_table`) that
    # let a later run be compared with this one question by question.
    output = simple_evaluate(
        model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
        samples=spec.samples, task_manager=manager, log_samples=True,
        gen_kwargs=spec.gen_kwargs or None,
        random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed, **chat_options(spec),
    )
    _raise_if_cancelled(store, job.id)
    return output


def _compute_requests(store: Store, job: Job, runner: Runner, tracker) -> dict[str, Any]:
    """A job whose items were supplied by an lm-eval run elsewhere: compute what is pending."""
    keys = [item["key"] for item in store.job_items(job.id)]
    tracker.refresh()
    runner.run(job.id, keys)
    _raise_if_cancelled(store, job.id)
    return {"results": {}}


def chat_options(spec: JobSpec) -> dict[str, Any]:
    """lm-eval's chat arguments of a job (`simple_evaluate`'s names).

    NOTE: `fewshot_as_multiturn` unset is lm-eval's CLI default: on with a chat template.
    """
    multiturn = spec.fewshot_as_multiturn
    return {"apply_chat_template": spec.apply_chat_template,
            "fewshot_as_multiturn": bool(spec.apply_chat_template) if multiturn is None else multiturn,
            "system_instruction": spec.system_instruction}


def submit_requests(store: Store, requests: list[tuple[str, list[Any]]], fingerprint: str,
                    model: str, label: str = "lm-eval",
                    chat_template_sha256: str | None = None) -> tuple[Job, list[str]]:
    """Record a queued job over lm-eval requests given as (kind, args); returns it and each
    request's item key. Items finished before (by any job) are reused; a job with nothing
    left to compute is done at once. `chat_template_sha256`: the chat template that rendered
    the requests' contexts, recorded with the job."""
    for kind, args in requests:
        try:
            check_request_args(kind, args)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
    keys, items = keyed_items(requests, fingerprint)
    spec = JobSpec(tasks=(label,), model=model, source="requests", fingerprint=fingerprint,
                   chat_template_sha256=chat_template_sha256)
    job = store.create_job(spec, work=items)
    if job.num_done == job.num_total:
        store.save_results(job.id, {"results": {}, "conserve": {"job": job.to_dict()}})
    return store.get_job(job.id), keys


def cancel_job(store: Store, job_id: str) -> Job:
    """Cancel a queued, running or failed job (one compare-and-set: `Store.cancel_job`); its
    replicas stop at their next check and its finished items stay. A done or cancelled job
    is a JobStateError, and stays as it was."""
    if not store.cancel_job(job_id):
        raise JobStateError(f"job {job_id} is already {store.get_job_state(job_id)}")
    return store.get_job(job_id)


def job_status(store: Store, job_id: str) -> dict[str, Any]:
    """What `status` and `GET /v1/jobs/{id}` show: the job, the replicas that computed or hold
    its items (per-replica progress), and its failed items with their errors."""
    job, replicas = store.job_status(job_id)
    return {**job.to_dict(), "replicas": replicas, "item_errors": store.item_errors(job_id)}


JOBS_LISTED = 100  # `jobs` and `GET /v1/jobs`: the newest, unless asked for more


def fleet_overview(store: Store, limit: int = JOBS_LISTED) -> dict[str, Any]:
    """What `jobs` and `GET /v1/jobs` show: the newest `limit` jobs (0: all), how many the
    store holds, and the live replicas."""
    return {"jobs": [j.to_dict() for j in store.list_jobs(limit or None)], "num_jobs": store.num_jobs(),
            "replicas": store.live_replicas()}


def job_results(store: Store, job_id: str) -> dict[str, Any]:
    results = store.get_results(job_id)
    if results is None:
        job = store.get_job(job_id)
        raise JobStateError(f"job {job_id} is {job.state} ({job.num_done}/{job.num_total}); "
                            "no results yet")
    return results


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per task and group: metric name (e.g. `acc,none`) -> value, without aliases."""
    return {
        name: {k: v for k, v in values.items() if k != "alias" and isinstance(v, (int, float))}
        for name, values in results.get("results", {}).items()
    }


def write_results_file(results: dict[str, Any], path: Path) -> Path:
    """A job's results at `path` (`<output>/<job-id>.json`, its per-document table beside it)
    and in lm-eval's layout in the same folder (`results.write_results`); returns `path`."""
    write_results(results, path.parent, pointer=path.name)
    return path


def read_results_file(path: Path) -> dict[str, Any]:
    """A results file written by `write_results_file`, with its per-document table."""
    results = json.loads(Path(path).read_text())
    if (table_path := samples_path(path)).is_file():
        results[PER_SAMPLE_KEY] = read_samples_file(table_path)
    return results


# -- helpers -----------------------------------------------------------------------------------


class _ProgressTracker:
    """Turns committed-item counts and generated tokens into (done, total, tokens) for a
    progress display."""

    def __init__(self, store: Store, job_id: str, on_progress: ProgressFn | None):
        self.store, self.job_id = store, job_id
        self.on_progress = on_progress or (lambda done, total, tokens: None)
        self.num_done = self.num_total = self.num_tokens = 0

    def refresh(self) -> None:
        """Counts from the store: once a job's items are added (each request kind's, in turn)."""
        job = self.store.get_job(self.job_id)
        self.num_done, self.num_total = job.num_done, job.num_total
        self._report()

    def advance(self, num_items: int) -> None:
        self.num_done += num_items
        self._report()

    def add_tokens(self, num_tokens: int) -> None:
        self.num_tokens += num_tokens
        self._report()

    def _report(self) -> None:
        self.on_progress(self.num_done, self.num_total, self.num_tokens)
