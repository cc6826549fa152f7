"""`conserve-bench serve`: online OpenAI traffic in front, evaluation jobs behind, one engine.

The online side is vLLM's own OpenAI-compatible app (`build_app` + `init_app_state`):
completions, chat completions, streaming, models, metrics. The job API (`/v1/jobs`) and the
offline pump are added to the same app; offline requests run at priority 1 on the same
`AsyncLLM`. One `guard.Guard` stands in front of all of it: the API key on every route but
`/health` (`/metrics` too, unless `--public-metrics`), a body cap (`--max-request-bytes`),
priority 0 forced on every route that runs the engine, and arrival stamps and latency samples
only for requests it admitted. `/health` is 503, naming the part, while the engine, the pump,
its heartbeat or the store is down (`health`). When the engine dies (or the pump stops for
good) the server stops, the pump gives its in-flight items back to pending, and `serve`
raises `EngineUnavailableError` (exit 3), as vLLM's own server exits, for a supervisor to
restart it. Under the `conserve` policy the engine runs `vllm_plugin.scheduler.ConserveScheduler`,
given the latency profile and the targets (`resolve_targets`) through vLLM's `additional_config`
(`vllm_plugin.overrides.engine_overrides`), and by default layer-wise preemption:
`vllm_plugin.connector.ConserveConnector` cuts offline-only steps short at a layer safepoint
when the guard stamps an online arrival (`vllm_plugin.arrivals.ArrivalSignal`), and
incremental KV checkpointing: the same connector keeps
offline requests' KV in a host pool (`--kv-checkpoint-gib`), so a preempted one resumes by
loading it. The live refit the scheduler writes to a file, and the pool's use the connector
writes, are read back here for `/metrics` (the refit is also stored under the profile's key).

vLLM names relied on: docs/vllm-contract.md#server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn

from conserve_bench.config import (DEFAULT_DB_URL, DEFAULT_MODEL, DEFAULT_PARTIAL_S,
                                   DEFAULT_PARTIAL_TOKENS, EngineConfig, LeaseConfig, ModelOptions,
                                   RunConfig, ServePolicy, default_kv_checkpoint_gib)
from conserve_bench.engine.local import (context_length, engine_args, engine_config, engine_environment,
                                         engine_fingerprint, is_cpu_build)
from conserve_bench.errors import ConserveError, EngineUnavailableError
from conserve_bench.sched.latency import LatencyModel
from conserve_bench.engine.models import resolve_model
from conserve_bench.sched.policy import (DEFAULT_MARGIN, DEFAULT_TAIL_QUANTILE, PolicyConfig, Targets,
                                         check_tail_quantile, check_targets, default_offline_step_s, default_targets,
                                         derived_max_slowdown)
from conserve_bench.sched.refit import RefitConfig, WarmStart
from conserve_bench.serve.guard import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_UPLOAD_BYTES, GuardConfig
from conserve_bench.serve.health import HealthCheck, Probe, StoreWatch, engine_probe
from conserve_bench.vllm_plugin.arrivals import ArrivalSignal
from conserve_bench.vllm_plugin.overrides import ConnectorConfig, engine_overrides, single_worker

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
FALLBACK_TTFT_MS, FALLBACK_TBT_MS = 1000.0, 200.0  # SLO metrics without a profile
REFIT_POLL_S = 5.0  # how often the server reads the engine's live refit
WATCHDOG_POLL_S = 1.0  # how often the server asks whether the engine died (vLLM's own: 5 s)


class ServeConfigError(ConserveError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    db_url: str = DEFAULT_DB_URL
    policy: ServePolicy = ServePolicy.CONSERVE  # a CLI string is taken too, and checked
    api_key: str | None = None
    public_metrics: bool = False  # /metrics without the key (a scraper on a trusted network)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies: 413, before parsing
    max_batch_file_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # `/v1/files` uploads (batch inputs)
    ttft_slo_ms: float | None = None  # None: derived from the latency profile
    tbt_slo_ms: float | None = None
    slo_margin: float = DEFAULT_MARGIN
    quantum_ms: float | None = None  # how long an arrival may wait behind offline-only work;
    # None: `Targets.arrival_wait_s` (bounded mode: the slowdown share of the reference
    # prompt's prefill; with SLOs, QUANTUM_FRACTION of the TTFT target)
    max_slowdown: float | None = None  # bounded mode's share; None: derived from the profile
    refit: bool = True  # plan with the live refit when it predicts the live steps better
    warm_start: bool = True  # start from the last server's live refit and tail margins (stored)
    tail_quantile: float = DEFAULT_TAIL_QUANTILE  # size offline work for this quantile of step time; 0: the mean
    layer_preemption: bool | None = None  # None: on under the conserve policy
    safepoint_every: int | None = None  # None: the device's (`policy.safepoint_every`)
    kv_checkpoint_gib: float | None = None  # None: `default_kv_checkpoint_gib()` under conserve
    offline_step_ms: float | None = None  # None: from the profile (`default_offline_step_s`)
    max_offline_inflight: int = 32
    max_batch_inflight: int | None = None  # an OpenAI batch's lines; None: `batch_window`
    partial_tokens: int = DEFAULT_PARTIAL_TOKENS  # offline generations' partials
    partial_s: float = DEFAULT_PARTIAL_S
    data_dir: str | None = None
    # the job API: folders of task YAML whose tasks clients may name (besides lm-eval's and
    # ours), and folders under which a client's data_dir may be (empty: `data_dir`'s own)
    include_paths: tuple[str, ...] = ()
    data_roots: tuple[str, ...] = ()
    output_dir: str = "results"
    profile: bool = True  # load this machine's latency profile; measure it once if missing
    step_log: str | None = None  # append every engine step (shape, time, plan) to this file
    leases: LeaseConfig = LeaseConfig()  # fleet mode: lease, heartbeat, attempts
    model_options: ModelOptions = ModelOptions()  # how the model is loaded (dtype, ...)
    engine_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        try:
            object.__setattr__(self, "policy", ServePolicy(self.policy))
        except ValueError:
            raise ServeConfigError(f"unknown policy {self.policy!r}: use {ServePolicy.names()}") from None
        if self.host not in LOOPBACK and not self.api_key:
            raise ServeConfigError(
                f"refusing to listen on {self.host} without --api-key; "
                "only loopback (127.0.0.1) may be served without a key")
        if self.policy == ServePolicy.CONSERVE and not self.profile:
            raise ServeConfigError("the conserve policy sizes offline work with this machine's "
                                   "latency profile: drop --no-profile, or use --policy priority")
        # NOTE: the policy's own rules, so a flag the engine would refuse fails here, at once.
        check_targets(_seconds(self.ttft_slo_ms), _seconds(self.tbt_slo_ms), self.slo_margin,
                      _seconds(self.quantum_ms), preemptive=bool(self.preempts_layers))
        for name in ("max_slowdown", "offline_step_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")
        if self.max_slowdown is not None and self.spends_slos:
            raise ServeConfigError("--max-slowdown bounds offline work when no SLO is given; "
                                   "with --ttft-slo-ms/--tbt-slo-ms offline work spends the SLOs")
        self._check_layer_preemption()
        self._check_folders()
        check_tail_quantile(self.tail_quantile)
        try:
            self.offline_run_config
            self.guard
        except ValueError as e:
            raise ServeConfigError(str(e)) from None

    @property
    def offline_run_config(self) -> RunConfig:
        """How the offline pump's runner feeds the engine."""
        return RunConfig(max_inflight=self.max_offline_inflight,
                         partial_tokens=self.partial_tokens, partial_s=self.partial_s)

    def batch_run_config(self, max_num_seqs: int) -> RunConfig:
        """How the pump feeds an OpenAI batch's lines (`batch_window` of the engine's seats)."""
        return replace(self.offline_run_config,
                       max_inflight=self.max_batch_inflight or batch_window(max_num_seqs))

    @property
    def guard(self) -> GuardConfig:
        """What the guard in front of the whole app enforces (`serve.guard`)."""
        return GuardConfig(api_key=self.api_key, public_metrics=self.public_metrics,
                           max_request_bytes=self.max_request_bytes,
                           max_upload_bytes=self.max_batch_file_bytes)

    @property
    def spends_slos(self) -> bool:
        """Whether explicit SLOs size offline work (else the bounded mode does)."""
        return self.ttft_slo_ms is not None or self.tbt_slo_ms is not None

    @property
    def one_worker(self) -> bool:
        """Whether the engine has one worker, which layer preemption and KV checkpoints need
        (`vllm_plugin.overrides.single_worker`)."""
        return self.model_options.tensor_parallel_size == 1

    @property
    def preempts_layers(self) -> bool:
        """Whether offline-only steps are cut short at layer safepoints by online arrivals."""
        if not self.one_worker:
            return False
        if self.layer_preemption is None:
            return self.policy == ServePolicy.CONSERVE
        return self.layer_preemption

    @property
    def checkpoint_gib(self) -> float:
        """The KV checkpoint pool: under `conserve`, the size given or the host's default;
        other policies are vLLM's own (a preempted request recomputes); none without one worker."""
        if self.policy != ServePolicy.CONSERVE or not self.one_worker:
            return 0.0
        return default_kv_checkpoint_gib() if self.kv_checkpoint_gib is None else self.kv_checkpoint_gib

    @property
    def client_data_roots(self) -> tuple[str, ...]:
        """Where a job API client's data_dir may be: at or below `--data-root`s, else the
        server's own `--data-dir`; nowhere without either."""
        if self.data_roots:
            return self.data_roots
        return (self.data_dir,) if self.data_dir else ()

    def _check_folders(self) -> None:
        for flag, folders in (("--include-path", self.include_paths), ("--data-root", self.data_roots)):
            for folder in folders:
                if not os.path.isdir(folder):
                    raise ServeConfigError(f"{flag} {folder!r} is not a folder")

    @property
    def loads_connector(self) -> bool:
        return self.preempts_layers or self.checkpoint_gib > 0

    def _check_layer_preemption(self) -> None:
        if self.model_options.deterministic and self.policy == ServePolicy.PRIORITY and is_cpu_build():
            raise ServeConfigError("--deterministic on vLLM's CPU build batches offline work apart "
                                   "from online traffic, which the conserve policy does: use "
                                   "--policy conserve (vLLM's batch-invariant kernels need a GPU)")
        if self.layer_preemption and self.policy != ServePolicy.CONSERVE:
            raise ServeConfigError("--layer-preemption on needs --policy conserve")
        if self.kv_checkpoint_gib and self.policy != ServePolicy.CONSERVE:
            raise ServeConfigError("--kv-checkpoint-gib needs --policy conserve (the other "
                                   "policies are vLLM's own: a preempted request recomputes)")
        if self.kv_checkpoint_gib is not None and not self.kv_checkpoint_gib >= 0:
            raise ServeConfigError(f"--kv-checkpoint-gib must be >= 0, got {self.kv_checkpoint_gib:g}")
        if self.safepoint_every is not None and self.safepoint_every < 1:
            raise ServeConfigError(f"--safepoint-every must be >= 1, got {self.safepoint_every}")
        if not self.preempts_layers and self.offline_step_ms is not None:
            raise ServeConfigError("--offline-step-ms sizes offline-only steps only with "
                                   "--layer-preemption on; with it off, use --quantum-ms")


def batch_window(max_num_seqs: int) -> int:
    """An OpenAI batch's lines in flight by default: half again the engine's seats. NOTE:
    generations end one by one, and the runner tops its window up a quarter at a time: with
    no more lines claimed than seats, seats stand empty between top-ups (a generation-heavy
    batch ran 10% slower at 64 than at 96 on 64 seats, as fast as vLLM's own priority
    scheduler then); the excess waits in vLLM's queue, and a kill costs no more than it."""
    return max_num_seqs + max_num_seqs // 2


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def vllm_cli_args(cfg: ServeConfig, engine_cfg: EngineConfig) -> list[str]:
    """The `vllm serve` flags that give the same engine as `submit`, plus the server's own."""
    if cfg.policy != ServePolicy.ONLINE_ONLY:
        engine_cfg = replace(engine_cfg, scheduling_policy="priority")
    flags = []
    for name, value in engine_args(engine_cfg).items():
        if name == "model":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # NOTE: vLLM's boolean flags: --x / --no-x
            flags.append(flag if value else "--no-" + flag[2:])
            continue
        flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    flags += ["--host", cfg.host, "--port", str(cfg.port),
              "--served-model-name", cfg.model, "--disable-uvicorn-access-log"]
    if cfg.api_key:
        flags += ["--api-key", cfg.api_key]
    return [engine_cfg.model_path, *flags]


def serve(cfg: ServeConfig) -> None:
    """Start the server and block until SIGINT/SIGTERM; then drain and return."""
    import uvloop

    model = resolve_model(cfg.model)
    engine_cfg = engine_config(model, cfg.model_options, **cfg.engine_overrides)
    engine_environment(engine_cfg)
    if cfg.policy == ServePolicy.CONSERVE and (cfg.layer_preemption is not False or cfg.kv_checkpoint_gib != 0):
        single_worker(engine_cfg.tensor_parallel_size)  # NOTE: says what tensor parallelism turns off
    profile = load_or_measure_profile(cfg, engine_cfg) if cfg.profile else None
    targets = resolve_targets(cfg, profile, engine_cfg.max_num_batched_tokens)
    if cfg.policy == ServePolicy.CONSERVE:
        log.warning("conserve: %s", targets.describe(profile.model))
    else:
        log.warning("online targets: TTFT %.0f ms, TBT %.0f ms (SLO metrics)",
                    targets.ttft_s * 1e3, targets.tbt_s * 1e3)
    arrivals = ArrivalSignal.create_temporary() if cfg.preempts_layers else None
    try:
        with tempfile.TemporaryDirectory(prefix="conserve-serve-") as workdir:
            refit_state = os.path.join(workdir, "refit.json")
            checkpoint_state = os.path.join(workdir, "kv_checkpoint.json")
            engine_cfg = with_plugins(engine_cfg, cfg, profile, targets, arrivals, refit_state,
                                      checkpoint_state, warm_start(cfg, profile))
            if cfg.loads_connector:
                log.warning("conserve: KV checkpoints in a host pool of %.2f GiB", cfg.checkpoint_gib)
            uvloop.run(_serve(cfg, engine_cfg, targets, profile, arrivals, refit_state, checkpoint_state))
    finally:
        if arrivals is not None:
            arrivals.remove()


def with_plugins(engine_cfg: EngineConfig, cfg: ServeConfig, profile, targets: Targets,
                 arrivals: ArrivalSignal | None, refit_state: str, checkpoint_state: str,
                 warm: WarmStart | None = None) -> EngineConfig:
    """The engine config with what `cfg` loads into vLLM (`engine_overrides`): the step log;
    under `conserve` the policy with the profile's model, started from `warm`, and the live
    refit (reported in `refit_state`); the connector (`connector_config`). Unchanged when it
    loads nothing."""
    conserve = cfg.policy == ServePolicy.CONSERVE
    connector = connector_config(cfg, arrivals, checkpoint_state)
    if not (cfg.step_log or conserve or connector):
        return engine_cfg
    return replace(engine_cfg, **engine_overrides(
        engine_cfg.additional_config, step_log=os.path.abspath(cfg.step_log) if cfg.step_log else None,
        policy=PolicyConfig(targets, profile.model, batch_apart=batches_apart(cfg, engine_cfg),
                            tail_quantile=cfg.tail_quantile or None)
        if conserve else None,
        refit=RefitConfig(adopt=cfg.refit) if conserve else None,
        refit_state=refit_state if conserve else None, connector=connector,
        warm_start=warm if conserve else None, tensor_parallel_size=engine_cfg.tensor_parallel_size))


def warm_start(cfg: ServeConfig, profile) -> WarmStart | None:
    """What the last `conserve` server on this profile learned live (`refit.WarmStart`: its
    adopted refit, its size corrections and tail margins, stored under the profile's key), or
    None: none stored, another policy, or `--no-warm-start`. Logged in one line, with the
    refit's age."""
    if cfg.policy != ServePolicy.CONSERVE or not cfg.warm_start or profile is None:
        return None
    from conserve_bench.profiling.profiles import refit_for
    from conserve_bench.store import Store

    found = refit_for(Store(cfg.db_url), profile.key)
    if found is None:
        return None
    status, stored_at = found
    warm = WarmStart.from_status(status)
    log.warning("conserve: warm start from the live refit stored %.0f s ago after %d steps: plans with "
                "%s, %d size corrections, tail margins mixed %.2f, offline %.2f (--no-warm-start: "
                "the profile's, 1.0)", max(0.0, time.time() - stored_at), status.num_steps,
                "the refit" if warm.model is not None and cfg.refit else "the profile's model",
                len(warm.corrections), warm.tail.mixed, warm.tail.offline)
    return warm


def batches_apart(cfg: ServeConfig, engine_cfg: EngineConfig) -> bool:
    """Whether `--deterministic` batches offline work apart from online traffic: where vLLM
    has no batch-invariant kernels (its CPU build), the strongest determinism there is."""
    return cfg.model_options.deterministic and not engine_cfg.batch_invariant


def connector_config(cfg: ServeConfig, arrivals: ArrivalSignal | None,
                     checkpoint_state: str) -> ConnectorConfig | None:
    """`ConserveConnector`'s settings, if `cfg` loads it: reading `arrivals` (None: no
    arrival cuts a step), keeping KV checkpoints in a pool of `cfg.checkpoint_gib`."""
    if not cfg.loads_connector:
        return None
    return ConnectorConfig(safepoint_every=cfg.safepoint_every, layer_preemption=cfg.preempts_layers,
                           arrival_path=str(arrivals.path) if arrivals else None,
                           checkpoint_gib=cfg.checkpoint_gib, checkpoint_state_path=checkpoint_state)


def slo_targets(ttft_slo_ms: float | None, tbt_slo_ms: float | None,
                model: LatencyModel | None) -> tuple[float, float]:
    """(TTFT, TBT) SLOs in seconds: the values given, else derived from the latency profile
    (`policy.default_targets`), else FALLBACK_*_MS. `serve` and `bench` both use this rule."""
    if model is not None:
        derived = default_targets(model)
        ttft_s, tbt_s = derived.ttft_s, derived.tbt_s
    else:
        ttft_s, tbt_s = FALLBACK_TTFT_MS / 1e3, FALLBACK_TBT_MS / 1e3
    return (_seconds(ttft_slo_ms) or ttft_s, _seconds(tbt_slo_ms) or tbt_s)


def resolve_targets(cfg: ServeConfig, profile, max_num_tokens: int) -> Targets:
    """The targets the server works to (`slo_targets`); without explicit SLOs, the bounded
    mode with `--max-slowdown` or the derived share (`derived_max_slowdown`: the bound's when
    planning against the tail, less the profile's held-out P90 error when not).
    With layer-wise preemption, offline-only steps are sized by `--offline-step-ms`, else by
    throughput (`policy.default_offline_step_s`), instead of the quantum."""
    model = profile.model if profile else None
    ttft_s, tbt_s = slo_targets(cfg.ttft_slo_ms, cfg.tbt_slo_ms, model)
    max_slowdown = None
    if not cfg.spends_slos:
        error = profile.holdout_error.p90_rel if profile and profile.holdout_error else None
        max_slowdown = cfg.max_slowdown or derived_max_slowdown(error, against_tail=bool(cfg.tail_quantile))
    offline_step_s = None
    if cfg.preempts_layers:
        offline_step_s = _seconds(cfg.offline_step_ms) or default_offline_step_s(model, max_num_tokens)
    return Targets(ttft_s=ttft_s, tbt_s=tbt_s, margin=cfg.slo_margin,
                   quantum_s=_seconds(cfg.quantum_ms), max_slowdown=max_slowdown,
                   offline_step_s=offline_step_s)


def load_or_measure_profile(cfg: ServeConfig, engine_cfg: EngineConfig):
    """The stored latency profile of this model on this machine; profiled (quick) if none.

    NOTE: a profile from other hardware or another vLLM version never matches the key, so
    it is never used; `profile_for` logs which fields differ.
    """
    from conserve_bench.profiling.profiler import run_profile
    from conserve_bench.profiling.profiles import current_key, profile_for
    from conserve_bench.store import Store

    store = Store(cfg.db_url)
    found = profile_for(store, current_key(engine_cfg.model_name, engine_cfg.dtype,
                                           engine_cfg.tensor_parallel_size))
    if found is None:
        log.warning("no latency profile for %s on this machine: profiling once (--quick)", cfg.model)
        found = run_profile(store, cfg.model, quick=True, options=cfg.model_options).profile
    log.warning("latency model: %s", _describe_profile(found))
    return found


def _describe_profile(profile) -> str:
    coefficients = dict(zip(profile.model.to_dict()["features"], profile.model.coefficients))
    return ", ".join(f"{name}={value:.3g}" for name, value in coefficients.items())


async def _serve(cfg: ServeConfig, engine_cfg: EngineConfig, targets: Targets, profile,
                 arrivals: ArrivalSignal | None, refit_state: str, checkpoint_state: str) -> None:
    """vLLM's OpenAI app with the job API and the offline pump on one engine, behind the
    guard, until a stop signal or the engine's death; `refit_state` and `checkpoint_state`
    are the files the engine core reports the live refit and the KV checkpoint pool in
    (watched for `/metrics`)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from conserve_bench.engine.openai_requests import OpenAIHandlers, OpenAIRequestEngine
    from conserve_bench.serve.arrivals import tag_arrivals
    from conserve_bench.serve.batchapi import BatchAnswers, BatchSweeper, install_batch_api
    from conserve_bench.serve.guard import Guard, generation_routes
    from conserve_bench.serve.jobapi import install_job_api
    from conserve_bench.serve.metrics import CheckpointWatcher, OnlineMetrics, ProcessWatch, RefitWatcher
    from conserve_bench.engine.async_llm import AsyncEngineAdapter
    from conserve_bench.serve.pump import OfflinePump
    from conserve_bench.store import Store

    store = Store(cfg.db_url, cfg.leases)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", *vllm_cli_args(cfg, engine_cfg)])
    async with build_async_engine_client(args) as client:
        supported_tasks = await client.get_supported_tasks()
        if arrivals is not None:
            tag_arrivals(client)  # NOTE: before the app's handlers take `client.generate`
        app = build_app(args, supported_tasks, client.model_config)
        metrics = OnlineMetrics(targets.ttft_s, targets.tbt_s)
        max_model_len = context_length(client.model_config)
        fingerprint = engine_fingerprint(engine_cfg, max_model_len, client.model_config)
        install_job_api(app, store, cfg, fingerprint, max_model_len)
        await init_app_state(client, app.state, args, supported_tasks)
        # NOTE: a batch's lines run through handlers of their own, vLLM's as its app has them,
        # over the same engine at offline priority (`engine.openai_requests`)
        handlers = await OpenAIHandlers.create(client, args, supported_tasks, cfg.partial_tokens)
        batch_answers = BatchAnswers(store)  # NOTE: the routes' and the sweeper's, one reuse
        install_batch_api(app, store, cfg.model, fingerprint, handlers.urls, batch_answers)
        loop = asyncio.get_running_loop()
        adapter = AsyncEngineAdapter(client, loop, fingerprint,
                                     max_model_len, on_tokens=metrics.offline_tokens,
                                     add_bos_token=engine_cfg.add_bos_token)
        batch_engine = OpenAIRequestEngine(handlers, loop, fingerprint,
                                           is_dead=lambda: client.errored is True,
                                           on_tokens=metrics.offline_tokens,
                                           on_answered=metrics.batch_tokens)
        pump = OfflinePump(store, adapter, cfg.offline_run_config, cfg.output_dir,
                           on_progress=metrics.job_progress,
                           label=f"serve {cfg.host}:{cfg.port}", model=engine_cfg.model_name,
                           include_paths=cfg.include_paths, batch_engine=batch_engine,
                           batch_run_cfg=cfg.batch_run_config(engine_cfg.max_num_seqs))
        store_watch = StoreWatch(store.live_replicas, cfg.leases.heartbeat_s, cfg.leases.lease_s)
        # NOTE: vLLM's app has built its middleware stack already; the guard wraps it from
        # outside, and reads the routes that run the engine off the app as built.
        guarded = Guard(app, cfg.guard, generation_routes(app, supported_tasks, client.model_config),
                        HealthCheck(health_probes(cfg, client, pump, store_watch)), metrics, arrivals)
        server = DrainingServer(uvicorn.Config(guarded, host=cfg.host, port=cfg.port,
                                                log_level="warning", timeout_graceful_shutdown=30))
        app.state.server = server  # NOTE: vLLM's EngineDeadError handler stops it too
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, _on_stop_signal, server, pump)
        if cfg.policy != ServePolicy.ONLINE_ONLY:
            pump.start()
        watcher = RefitWatcher(refit_state, store, profile.key if profile else None)
        try:
            await serve_until_stopped(server, pump, client, [
                watcher.run(REFIT_POLL_S), CheckpointWatcher(checkpoint_state).run(REFIT_POLL_S),
                store_watch.run(), BatchSweeper(store, batch_answers).run(), ProcessWatch().run()])
        finally:
            watcher.poll()  # NOTE: the last refit the engine wrote is stored too


def health_probes(cfg: ServeConfig, engine_client, pump, store_watch: StoreWatch) -> dict[str, Probe]:
    """What `/health` asks: the engine and the store; the pump and its heartbeat if it runs."""
    probes = {"engine": engine_probe(engine_client), "store": store_watch.probe}
    if cfg.policy != ServePolicy.ONLINE_ONLY:  # NOTE: else never started: nothing of theirs can be down
        probes |= {"pump": pump.health, "heartbeat": pump.replica.health}
    return probes


async def serve_until_stopped(server: uvicorn.Server, pump, engine_client, background=(),
                              watchdog_poll_s: float = WATCHDOG_POLL_S) -> None:
    """Serve, with the `background` coroutines and the watchdog, until a stop signal or the
    engine's death; then the pump gives its in-flight items back to pending. Raises
    `EngineUnavailableError` (exit 3) if the engine died or the pump stopped for good."""
    tasks = [asyncio.create_task(watch_engine(engine_client, pump, server, watchdog_poll_s)),
             *(asyncio.create_task(coroutine) for coroutine in background)]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        # NOTE: uvicorn has stopped accepting and drained online requests by now; the pump
        # admits nothing new and returns its in-flight items to pending before the
        # engine shuts down.
        await asyncio.get_running_loop().run_in_executor(None, pump.stop)
    if reason := fatal_reason(engine_client, pump):
        raise EngineUnavailableError(f"serve stopped: {reason}; its in-flight offline items went "
                                     "back to pending (restart it to carry on)")


async def watch_engine(engine_client, pump, server: uvicorn.Server,
                       poll_s: float = WATCHDOG_POLL_S) -> None:
    """Once the engine died (or the pump stopped for good): the pump admits nothing more and
    the server stops. vLLM's `launcher.watchdog_loop` does the same for its own server: a
    dead engine never comes back within the process."""
    while (reason := fatal_reason(engine_client, pump)) is None:
        await asyncio.sleep(poll_s)
    log.error("stopping: %s", reason)
    pump.request_stop()
    server.should_exit = True


def fatal_reason(engine_client, pump) -> str | None:
    """Why the server cannot go on: the engine died (`AsyncLLM.errored`: its engine-core
    process exited, or its output handler ended), or the pump stopped for good."""
    if engine_client.errored:
        return "the engine died (EngineDeadError)"
    return pump.fatal


class DrainingServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # NOTE: uvicorn re-raises a captured SIGTERM once it has served, which would kill the
        # process before the pump gives its items back; `_serve` handles the signals itself.
        yield


def _on_stop_signal(server, pump) -> None:
    pump.request_stop()  # no new offline work from now on
    server.should_exit = True  # uvicorn stops accepting and lets online requests finish
