"""Runs CI configs to a report: one job per config file and settings group, named by run key.

Embedded (vLLM starts here, and only if something is left to compute) or on a running
`serve` (`POST /v1/jobs` with the run key; its pump computes the job as offline work behind
online traffic). At the deadline or on SIGINT/SIGTERM it stops claiming work, gives back what
it claimed, and reports INCOMPLETE; the same command with the same run key then re-attaches to
the same jobs and computes only what is missing. Everything is checked before a job exists.
A server that is down or restarting is waited for up to `server_wait_s` (`serve.client`), then
the report is an error (exit 3); a stop during that wait is a stop. Never writes a baseline
from a run with an invalid (NaN, infinite) score.

    >>> report = run_ci(load_configs(["ci/"]), CIOptions(run_key="2024-06-01-abc123"))
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from conserve_bench.ci import ExitCode
from conserve_bench.ci.baseline import write_baselines
from conserve_bench.ci.suite import CIConfig, CIConfigError, job_run_key
from conserve_bench.ci.report import JobOutcome, Report, build_report, with_baselines_written
from conserve_bench.config import JobSpec, ModelOptions, RunConfig
from conserve_bench.errors import (ConserveError, DataDirError, EngineUnavailableError, JobStateError,
                                   first_line, one_line_error)
from conserve_bench.jobs import lifecycle
from conserve_bench.jobs.runner import Stopped
from conserve_bench.jobs.samples import PER_SAMPLE_KEY
from conserve_bench.serve.client import SERVER_WAIT_S, redact
from conserve_bench.store import JobState

STOP_MARGIN_S = 15.0  # stop claiming this long before the deadline: release, report, exit
POLL_S = 1.0

ProgressFn = Callable[[str, int, int], None]  # (job_id, num_done, num_total)


@dataclass(frozen=True)
class CIOptions:
    run_key: str | None = None
    deadline: float | None = None  # Unix time by which the command must have exited
    compare_to: str | None = None  # a job id or a results file
    write_baseline: bool = False
    output_dir: str | None = "results"
    commit: str | None = None
    max_inflight: int = 64
    server: str | None = None
    api_key: str | None = None
    server_wait_s: float = SERVER_WAIT_S  # how long a server may be down before the run is an error
    db_url: str | None = None

    def __post_init__(self):
        if self.run_key is not None and not self.run_key.strip():
            raise CIConfigError("--run-key: must not be empty")
        if self.max_inflight < 1:
            raise CIConfigError("--max-inflight: must be at least 1")
        if not self.server_wait_s >= 0:
            raise CIConfigError("--server-wait: must be 0 or more seconds")


def parse_deadline(deadline: str | None, time_budget: str | None,
                   now: Callable[[], float] = time.time) -> float | None:
    """`--deadline` (ISO 8601 with a zone, e.g. 2024-06-01T06:00:00Z, or Unix seconds) and
    `--time-budget` (seconds, or 90m, 1h30m, 45s) as one Unix time: the earlier of the two."""
    found = [t for t in (_parse_time(deadline), _parse_budget(time_budget, now)) if t is not None]
    return min(found) if found else None


def _parse_time(text: str | None) -> float | None:
    from datetime import datetime

    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise CIConfigError(f"--deadline: {text!r} is not an ISO 8601 time or Unix seconds") from None


def _parse_budget(text: str | None, now: Callable[[], float]) -> float | None:
    import re

    if text is None:
        return None
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not match or not any(match.groups()):
        raise CIConfigError(f"--time-budget: {text!r} is not a duration (e.g. 3600, 90m, 1h30m)")
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return now() + hours * 3600 + minutes * 60 + seconds


class Stopper:
    """Answers "stop claiming work?": at the deadline (less `STOP_MARGIN_S`) or once a signal
    came. A second SIGINT/SIGTERM stops at once (KeyboardInterrupt); either way the runner gives
    its claimed items back."""

    def __init__(self, deadline: float | None = None, clock: Callable[[], float] = time.time):
        self.stop_at = None if deadline is None else deadline - STOP_MARGIN_S
        self.clock = clock
        self.reason: str | None = None

    def __call__(self) -> bool:
        if self.reason is None and self.stop_at is not None and self.clock() >= self.stop_at:
            self.reason = "deadline reached"
        return self.reason is not None

    def on_signal(self, signum: int, _frame=None) -> None:
        if self.reason is not None and self.reason.startswith("interrupted"):
            raise KeyboardInterrupt
        self.reason = f"interrupted by {signal.Signals(signum).name}"

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass
class _PlannedJob:
    config: CIConfig
    spec: JobSpec
    run_key: str | None
    job: dict[str, Any] | None = None
    results: dict[str, Any] | None = None


def run_ci(configs: Sequence[CIConfig], options: CIOptions, *, engine=None,
           stopper: Stopper | None = None, on_progress: ProgressFn | None = None) -> Report:
    """Check, attach, run, gate, report (and with `write_baseline`, rewrite the configs).

    `engine` (tests) is used instead of starting one. Raises `ConserveError` for what must be
    fixed before a run (exit 2); an unreachable server or a dead engine is a report with
    status "error", a stop at the deadline or on a signal one with status "incomplete".
    """
    stopper = stopper or Stopper(options.deadline)
    backend = _ServerBackend(options, stopper) if options.server else _EmbeddedBackend(options, engine)
    try:
        for cfg in configs:
            backend.check(cfg)
        reference = backend.reference(options.compare_to) if options.compare_to else None
        planned = [_PlannedJob(cfg, spec, job_run_key(options.run_key, spec) if options.run_key else None)
                   for cfg in configs for spec in cfg.job_specs()]
        stopped, error = _run_all(backend, planned, stopper, on_progress or (lambda *a: None))
    finally:
        backend.close()
    outcomes = [JobOutcome(p.config, p.spec.tasks, p.job, p.results) for p in planned if p.job]
    report = build_report(configs, outcomes, reference, run_key=options.run_key, commit=options.commit,
                          compared_to=options.compare_to, stopped=stopped, error=error)
    if options.write_baseline:
        report = _write_baselines(report, outcomes)
    return report


def _write_baselines(report: Report, outcomes: Sequence[JobOutcome]) -> Report:
    """The configs rewritten with a finished run's scores; none from a run that did not finish
    or measured NaN (a NaN baseline would pass every later run)."""
    if report.status == "invalid":
        return replace(report, notes=(*report.notes, "baselines not written: a score is not a finite number"))
    if report.exit_code not in (ExitCode.PASS, ExitCode.REGRESSION):
        return report
    return with_baselines_written(report, [str(p) for p in write_baselines(report, outcomes)])


def _run_all(backend, planned: list[_PlannedJob], stopper: Stopper,
             on_progress: ProgressFn) -> tuple[str | None, str | None]:
    """Attach every job, then run them in order; returns (why it stopped, infrastructure error)."""
    try:
        for p in planned:
            p.job = backend.attach(p)
        for p in planned:
            if stopper():
                break
            p.results = backend.run(p, stopper, on_progress)
    except (Stopped, KeyboardInterrupt):
        stopper.reason = stopper.reason or "interrupted"
    except EngineUnavailableError as e:
        if not stopper():  # NOTE: else the wait for a server was cut short by the stop
            return None, str(e)
    except ConserveError:
        raise
    except Exception as e:  # the engine died, or vLLM failed to start
        return None, one_line_error(e)
    if any(p.results is None for p in planned):
        for p in (p for p in planned if p.job and p.results is None):
            with contextlib.suppress(ConserveError):  # progress for the report, if reachable
                p.job = backend.status(p.job["id"])
        done = sum(p.results is not None for p in planned)
        how = ("run again with the same --run-key to resume" if planned[0].run_key
               else "run again to resume (finished items are reused)")
        return f"{stopper.reason or 'interrupted'}: {done} of {len(planned)} jobs finished; {how}", None
    return None, None


# -- where the jobs run ---------------------------------------------------------------------------


def check_tasks_of(cfg: CIConfig, manager, allow_paths: bool = True) -> None:
    """Every task resolves (lm-eval's name, group or YAML file), or the file and key are named."""
    from conserve_bench.jobs.taskspec import check_tasks

    for task in cfg.tasks:
        try:
            check_tasks([task.name], manager, allow_paths=allow_paths)
        except ConserveError as e:
            raise CIConfigError(f"{cfg.path}: tasks.{task.name}: {e}") from None


class _EmbeddedBackend:
    """Jobs in the local store, run on an engine started here (one model at a time)."""

    def __init__(self, options: CIOptions, engine=None):
        self.options = options
        self._store = None
        self._engine, self._engine_model, self._owns_engine = engine, None, engine is None

    @property
    def store(self):
        """Opened (and created) only once the configs are checked: a bad config writes nothing."""
        from conserve_bench.config import default_db_url
        from conserve_bench.store import Store

        if self._store is None:
            self._store = Store(self.options.db_url or default_db_url())
        return self._store

    def check(self, cfg: CIConfig) -> None:
        from conserve_bench.engine.models import resolve_model
        from conserve_bench.jobs.taskspec import task_manager

        try:
            manager = task_manager(cfg.data_dir)
        except DataDirError as e:
            raise CIConfigError(f"{cfg.path}: data_dir: {e}") from None
        check_tasks_of(cfg, manager)
        _check_samples(cfg, manager)
        try:
            resolve_model(cfg.model)
        except ConserveError as e:
            raise CIConfigError(f"{cfg.path}: model: {e}") from None

    def reference(self, ref: str) -> dict[str, Any]:
        return _reference(ref, lambda job_id: lifecycle.job_results(self.store, job_id))

    def attach(self, p: _PlannedJob) -> dict[str, Any]:
        return lifecycle.submit_job(self.store, p.spec, p.run_key).to_dict()

    def run(self, p: _PlannedJob, stopper: Stopper, on_progress: ProgressFn) -> dict[str, Any]:
        job_id = p.job["id"]
        if self.store.get_job(job_id).state != JobState.DONE:
            lifecycle.run_job(self.store, job_id, self._engine_for(p.spec),
                              RunConfig(max_inflight=self.options.max_inflight), output_dir=None,
                              on_progress=lambda done, total, _tokens: on_progress(job_id, done, total),
                              should_stop=stopper)
        p.job = self.store.get_job(job_id).to_dict()
        return _keep(lifecycle.job_results(self.store, job_id), self.options.output_dir)

    def status(self, job_id: str) -> dict[str, Any]:
        return self.store.get_job(job_id).to_dict()

    def _engine_for(self, spec: JobSpec):
        """The engine of the spec's model, loaded as its options say: started anew only when
        the model or its options change."""
        from conserve_bench.engine import local as local_engine
        from conserve_bench.engine.models import resolve_model

        wanted = (spec.model, spec.model_options)
        if self._owns_engine and self._engine_model != wanted:
            self.close()
            self._engine = local_engine.start_engine(resolve_model(spec.model), options=spec.model_options)
            self._engine_model = wanted
        return self._engine

    def close(self) -> None:
        if self._owns_engine and self._engine is not None:
            self._engine.close()
            self._engine = None


class _ServerBackend:
    """Jobs on a running `conserve-bench serve`, computed by its offline pump."""

    def __init__(self, options: CIOptions, stopper: Stopper):
        from conserve_bench.serve.client import JobClient

        self.client = JobClient(options.server, options.api_key, max_wait_s=options.server_wait_s,
                                should_stop=stopper)
        self.options = options
        self._served: str | None = None

    def check(self, cfg: CIConfig) -> None:
        from conserve_bench.jobs.taskspec import task_manager

        self._served = self._served or self.client.model()
        if cfg.model != self._served:
            raise CIConfigError(f"{cfg.path}: model: the server at {self.client.base_url} serves "
                                f"{self._served}, not {cfg.model}")
        if given := [k for k, v in cfg.model_options.to_dict().items() if v != getattr(ModelOptions(), k)]:
            raise CIConfigError(f"{cfg.path}: {given[0]}: the server at {self.client.base_url} loads "
                                "its model as its own options say; drop the model options or run embedded")
        # names only: the data is the server's, and a server takes no task YAML by path
        # NOTE: a client install has no lm-eval: the server checks the names as each job is posted
        if importlib.util.find_spec("lm_eval") is not None:
            check_tasks_of(cfg, task_manager(None), allow_paths=False)

    def reference(self, ref: str) -> dict[str, Any]:
        return _reference(ref, lambda job_id: self.client.results(job_id, full=True))

    def attach(self, p: _PlannedJob) -> dict[str, Any]:
        s = p.spec
        return self.client.submit(list(s.tasks), s.limit, s.num_fewshot, s.data_dir, s.gen_kwargs,
                                  s.samples, p.run_key, apply_chat_template=s.apply_chat_template,
                                  fewshot_as_multiturn=s.fewshot_as_multiturn,
                                  system_instruction=s.system_instruction)

    def run(self, p: _PlannedJob, stopper: Stopper, on_progress: ProgressFn) -> dict[str, Any]:
        """Follow the job until done; at a stop the job stays on the server (a rerun with the
        same key re-attaches to it, and whatever the pump finished meanwhile is kept)."""
        job_id = p.job["id"]
        while (status := self.client.status(job_id))["state"] != JobState.DONE:
            on_progress(job_id, status["done"], status["total"])
            if status["state"] == JobState.CANCELLED:
                raise JobStateError(f"job {job_id} was cancelled on the server; use a new --run-key")
            if status["state"] == JobState.FAILED:
                raise EngineUnavailableError(f"job {job_id} failed on the server: {redact(status['error'] or '')}")
            if stopper():
                raise Stopped(stopper.reason)
            time.sleep(POLL_S)
        p.job = status
        on_progress(job_id, status["done"], status["total"])
        return _keep(self.client.results(job_id, full=True), self.options.output_dir)

    def status(self, job_id: str) -> dict[str, Any]:
        return self.client.status(job_id)

    def close(self) -> None:
        pass


def _check_samples(cfg: CIConfig, manager) -> None:
    """Fixed document indices exist in their task (lm-eval would fail mid-run otherwise)."""
    for task in (t for t in cfg.tasks if t.samples):
        built = manager.load([task.name])["tasks"]
        if task.name not in built:
            raise CIConfigError(f"{cfg.path}: tasks.{task.name}.samples: {task.name} is a group; "
                                "fix documents per task")
        num_docs = len(built[task.name].eval_docs)
        if task.samples[-1] >= num_docs:
            raise CIConfigError(f"{cfg.path}: tasks.{task.name}.samples: index {task.samples[-1]} "
                                f"is past the task's {num_docs} documents")


def _reference(ref: str, job_results: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The run to compare with: a results file (with its per-document table beside it) or a job."""
    results = _read_reference(Path(ref)) if Path(ref).is_file() else job_results(ref)
    if PER_SAMPLE_KEY not in results:
        raise CIConfigError(f"--compare-to {ref}: has no per-document table "
                            "(run before conserve-bench kept one, or its .samples.jsonl is missing)")
    return results


def _read_reference(path: Path) -> dict[str, Any]:
    try:
        return lifecycle.read_results_file(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CIConfigError(f"--compare-to {path}: not a readable results file: {first_line(e)}") from None


def _keep(results: dict[str, Any], output_dir: str | None) -> dict[str, Any]:
    """Write a finished job's results (lm-eval's layout) into `output_dir`, and return them."""
    if output_dir is not None:
        lifecycle.write_results_file(results, Path(output_dir) / f"{results['conserve']['job']['id']}.json")
    return results
