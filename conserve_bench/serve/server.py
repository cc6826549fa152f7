"""`conserve-bench serve`: online OpenAI traffic in front, evaluation jobs behind, one engine.

The online side is vLLM's own OpenAI-compatible app (`build_app` + `init_app_state`):
completions, chat completions, streaming, models, health, metrics. Every request on the
online routes is forced to priority 0. The job API (`/v1/jobs`) and the offline pump are
added to the same app; offline requests run at priority 1 on the same `AsyncLLM`. Under the
`conserve` policy the engine runs `scheduler.ConserveScheduler`, given the latency profile and
the targets (`resolve_targets`) through vLLM's `additional_config`, and by default layer-wise
preemption: `engine.connector.ConserveConnector` cuts offline-only steps short at a layer
safepoint when the middleware stamps an online arrival (`engine.arrivals.ArrivalSignal`), and
incremental KV checkpointing: the same connector keeps offline requests' KV in a host pool
(`--kv-checkpoint-gib`), so a preempted one resumes by loading it. The live refit the
scheduler writes to a file, and the pool's use the connector writes, are read back here for
`/metrics` (the refit is also stored under the profile's key).

vLLM 0.32.0 names relied on: `vllm.entrypoints.launchers.cli_args.make_arg_parser`,
`vllm.entrypoints.launchers.api_server.entry.build_async_engine_client`,
`vllm.entrypoints.launchers.app.build_app`,
`vllm.entrypoints.launchers.api_server.app_state.init_app_state`,
`vllm.utils.argparse_utils.FlexibleArgumentParser`, and the `--api-key` middleware that
guards every `/v1` path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn

from conserve_bench.config import (DEFAULT_CHECKPOINT_S, DEFAULT_CHECKPOINT_TOKENS, DEFAULT_DB_URL,
                                   DEFAULT_MODEL, EngineConfig, LeaseConfig, RunConfig,
                                   default_kv_checkpoint_gib)
from conserve_bench.engine.arrivals import ArrivalSignal
from conserve_bench.engine.local import context_length, engine_args, engine_environment
from conserve_bench.engine.plugin import ONLINE_PRIORITY, conserve_overrides
from conserve_bench.errors import ConserveError
from conserve_bench.sched.latency import LatencyModel
from conserve_bench.engine.models import resolve_model
from conserve_bench.sched.policy import (DEFAULT_MARGIN, SAFEPOINT_EVERY, PolicyConfig, Targets,
                                         check_targets, default_offline_step_s, default_targets,
                                         derived_max_slowdown)
from conserve_bench.sched.refit import RefitConfig

log = logging.getLogger(__name__)

POLICIES = ("conserve", "priority", "online-only")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ONLINE_ROUTES = ("/v1/completions", "/v1/chat/completions")
FALLBACK_TTFT_MS, FALLBACK_TBT_MS = 1000.0, 200.0  # SLO metrics without a profile
REFIT_POLL_S = 5.0  # how often the server reads the engine's live refit


class ServeConfigError(ConserveError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    db_url: str = DEFAULT_DB_URL
    policy: str = "conserve"
    api_key: str | None = None
    ttft_slo_ms: float | None = None  # None: derived from the latency profile
    tbt_slo_ms: float | None = None
    slo_margin: float = DEFAULT_MARGIN
    quantum_ms: float | None = None  # None: `Targets.quantum_for` (bounded mode: the slowdown
    # share of the reference prompt's prefill; with SLOs, QUANTUM_FRACTION of the TTFT target)
    max_slowdown: float | None = None  # bounded mode's share; None: derived from the profile
    refit: bool = True  # plan with the live refit when it predicts the live steps better
    layer_preemption: bool | None = None  # None: on under the conserve policy
    safepoint_every: int = SAFEPOINT_EVERY
    kv_checkpoint_gib: float | None = None  # None: `default_kv_checkpoint_gib()` under conserve
    offline_step_ms: float | None = None  # None: from the profile (`default_offline_step_s`)
    max_offline_inflight: int = 32
    checkpoint_tokens: int = DEFAULT_CHECKPOINT_TOKENS  # offline generations' checkpoints
    checkpoint_s: float = DEFAULT_CHECKPOINT_S
    data_dir: str | None = None
    output_dir: str = "results"
    profile: bool = True  # load this machine's latency profile; measure it once if missing
    step_log: str | None = None  # append every engine step (shape, time, plan) to this file
    leases: LeaseConfig = LeaseConfig()  # fleet mode: lease, heartbeat, attempts
    engine_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ServeConfigError(f"unknown policy {self.policy!r}: use {', '.join(POLICIES)}")
        if self.host not in LOOPBACK and not self.api_key:
            raise ServeConfigError(
                f"refusing to listen on {self.host} without --api-key; "
                "only loopback (127.0.0.1) may be served without a key")
        if self.policy == "conserve" and not self.profile:
            raise ServeConfigError("the conserve policy sizes offline work with this machine's "
                                   "latency profile: drop --no-profile, or use --policy priority")
        # NOTE: the policy's own rules, so a flag the engine would refuse fails here, at once.
        check_targets(_seconds(self.ttft_slo_ms), _seconds(self.tbt_slo_ms), self.slo_margin,
                      _seconds(self.quantum_ms))
        for name in ("max_slowdown", "offline_step_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")
        if self.max_slowdown is not None and self.spends_slos:
            raise ServeConfigError("--max-slowdown bounds offline work when no SLO is given; "
                                   "with --ttft-slo-ms/--tbt-slo-ms offline work spends the SLOs")
        self._check_layer_preemption()
        try:
            self.offline_run_config
        except ValueError as e:
            raise ServeConfigError(str(e)) from None

    @property
    def offline_run_config(self) -> RunConfig:
        """How the offline pump's runner feeds the engine."""
        return RunConfig(max_inflight=self.max_offline_inflight,
                         checkpoint_tokens=self.checkpoint_tokens, checkpoint_s=self.checkpoint_s)

    @property
    def spends_slos(self) -> bool:
        """Whether explicit SLOs size offline work (else the bounded mode does)."""
        return self.ttft_slo_ms is not None or self.tbt_slo_ms is not None

    @property
    def preempts_layers(self) -> bool:
        """Whether offline-only steps are cut short at layer safepoints by online arrivals."""
        return self.policy == "conserve" if self.layer_preemption is None else self.layer_preemption

    @property
    def checkpoint_gib(self) -> float:
        """The KV checkpoint pool: under `conserve`, the size given or the host's default;
        other policies are vLLM's own (a preempted request recomputes)."""
        if self.policy != "conserve":
            return 0.0
        return default_kv_checkpoint_gib() if self.kv_checkpoint_gib is None else self.kv_checkpoint_gib

    @property
    def loads_connector(self) -> bool:
        return self.preempts_layers or self.checkpoint_gib > 0

    def _check_layer_preemption(self) -> None:
        if self.layer_preemption and self.policy != "conserve":
            raise ServeConfigError("--layer-preemption on needs --policy conserve")
        if self.kv_checkpoint_gib and self.policy != "conserve":
            raise ServeConfigError("--kv-checkpoint-gib needs --policy conserve (the other "
                                   "policies are vLLM's own: a preempted request recomputes)")
        if self.kv_checkpoint_gib is not None and not self.kv_checkpoint_gib >= 0:
            raise ServeConfigError(f"--kv-checkpoint-gib must be >= 0, got {self.kv_checkpoint_gib:g}")
        if self.safepoint_every < 1:
            raise ServeConfigError(f"--safepoint-every must be >= 1, got {self.safepoint_every}")
        if self.preempts_layers and self.quantum_ms is not None:
            raise ServeConfigError("--quantum-ms caps offline-only steps only with "
                                   "--layer-preemption off; with it on, use --offline-step-ms")
        if not self.preempts_layers and self.offline_step_ms is not None:
            raise ServeConfigError("--offline-step-ms sizes offline-only steps only with "
                                   "--layer-preemption on; with it off, use --quantum-ms")


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def vllm_cli_args(cfg: ServeConfig, engine_cfg: EngineConfig) -> list[str]:
    """The `vllm serve` flags that give the same engine as `submit`, plus the server's own."""
    if cfg.policy != "online-only":
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
    engine_cfg = EngineConfig(model_path=model.path, model_name=model.name, **cfg.engine_overrides)
    engine_environment(engine_cfg)
    profile = load_or_measure_profile(cfg, engine_cfg) if cfg.profile else None
    targets = resolve_targets(cfg, profile, engine_cfg.max_num_batched_tokens)
    if cfg.policy == "conserve":
        log.warning("conserve: %s", targets.describe(profile.model))
    else:
        log.warning("online targets: TTFT %.0f ms, TBT %.0f ms (SLO metrics)",
                    targets.ttft_s * 1e3, targets.tbt_s * 1e3)
    if cfg.step_log:
        engine_cfg = with_conserve_config(engine_cfg, step_log=os.path.abspath(cfg.step_log))
    arrivals = ArrivalSignal.create_temporary() if cfg.preempts_layers else None
    try:
        with tempfile.TemporaryDirectory(prefix="conserve-serve-") as workdir:
            refit_state = os.path.join(workdir, "refit.json")
            checkpoint_state = os.path.join(workdir, "kv_checkpoint.json")
            if cfg.policy == "conserve":
                engine_cfg = with_conserve_config(
                    engine_cfg, policy=PolicyConfig(targets, profile.model).to_dict(),
                    refit=RefitConfig(adopt=cfg.refit).to_dict(), refit_state=refit_state)
            if cfg.loads_connector:
                engine_cfg = with_connector(engine_cfg, cfg, arrivals, checkpoint_state)
                log.warning("conserve: KV checkpoints in a host pool of %.2f GiB", cfg.checkpoint_gib)
            uvloop.run(_serve(cfg, engine_cfg, targets, profile, arrivals, refit_state, checkpoint_state))
    finally:
        if arrivals is not None:
            arrivals.remove()


def with_connector(engine_cfg: EngineConfig, cfg: ServeConfig, arrivals: ArrivalSignal | None,
                   checkpoint_state: str) -> EngineConfig:
    """The engine config with `ConserveConnector` loaded: reading `arrivals` (None: no arrival
    cuts a step), keeping KV checkpoints in a pool of `cfg.checkpoint_gib`."""
    from conserve_bench.engine.connector import ConnectorConfig

    connector = ConnectorConfig(safepoint_every=cfg.safepoint_every,
                                arrival_path=str(arrivals.path) if arrivals else None,
                                checkpoint_gib=cfg.checkpoint_gib,
                                checkpoint_state_path=checkpoint_state)
    return replace(engine_cfg, **connector.engine_overrides())


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
    mode with `--max-slowdown` or the share derived from the profile's held-out P90 error.
    With layer-wise preemption, offline-only steps are sized by `--offline-step-ms`, else by
    throughput (`policy.default_offline_step_s`), instead of the quantum."""
    model = profile.model if profile else None
    ttft_s, tbt_s = slo_targets(cfg.ttft_slo_ms, cfg.tbt_slo_ms, model)
    max_slowdown = None
    if not cfg.spends_slos:
        error = profile.holdout_error.p90_rel if profile and profile.holdout_error else None
        max_slowdown = cfg.max_slowdown or derived_max_slowdown(error)
    offline_step_s = None
    if cfg.preempts_layers:
        offline_step_s = _seconds(cfg.offline_step_ms) or default_offline_step_s(model, max_num_tokens)
    return Targets(ttft_s=ttft_s, tbt_s=tbt_s, margin=cfg.slo_margin,
                   quantum_s=_seconds(cfg.quantum_ms), max_slowdown=max_slowdown,
                   offline_step_s=offline_step_s)


def with_conserve_config(engine_cfg: EngineConfig, **entries: Any) -> EngineConfig:
    """The engine config with ConserveScheduler and `entries` added to its plug-in config
    (`engine.plugin.ENTRIES`)."""
    return replace(engine_cfg, **conserve_overrides(engine_cfg.additional_config, **entries))


def load_or_measure_profile(cfg: ServeConfig, engine_cfg: EngineConfig):
    """The stored latency profile of this model on this machine; profiled (quick) if none.

    NOTE: a profile from other hardware or another vLLM version never matches the key, so
    it is never used; `profile_for` logs which fields differ.
    """
    from conserve_bench.sched.profiler import run_profile
    from conserve_bench.sched.profiles import current_key, profile_for
    from conserve_bench.store import Store

    store = Store(cfg.db_url)
    found = profile_for(store, current_key(engine_cfg.model_name, engine_cfg.dtype))
    if found is None:
        log.warning("no latency profile for %s on this machine: profiling once (--quick)", cfg.model)
        found = run_profile(store, cfg.model, quick=True).profile
    log.warning("latency model: %s", _describe_profile(found))
    return found


def _describe_profile(profile) -> str:
    coefficients = dict(zip(profile.model.to_dict()["features"], profile.model.coefficients))
    return ", ".join(f"{name}={value:.3g}" for name, value in coefficients.items())


async def _serve(cfg: ServeConfig, engine_cfg: EngineConfig, targets: Targets, profile,
                 arrivals: ArrivalSignal | None, refit_state: str, checkpoint_state: str) -> None:
    """vLLM's OpenAI app with the job API and the offline pump on one engine, until a stop
    signal; `refit_state` and `checkpoint_state` are the files the engine core reports the
    live refit and the KV checkpoint pool in (watched for `/metrics`)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from conserve_bench.serve.jobapi import install_job_api
    from conserve_bench.serve.metrics import CheckpointWatcher, OnlineMetrics, RefitWatcher
    from conserve_bench.engine.async_llm import AsyncEngineAdapter
    from conserve_bench.serve.pump import OfflinePump
    from conserve_bench.store import Store

    store = Store(cfg.db_url, cfg.leases)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", *vllm_cli_args(cfg, engine_cfg)])
    async with build_async_engine_client(args) as client:
        supported_tasks = await client.get_supported_tasks()
        app = build_app(args, supported_tasks, client.model_config)
        metrics = OnlineMetrics(targets.ttft_s, targets.tbt_s)
        max_model_len = context_length(client.model_config)
        fingerprint = engine_cfg.fingerprint(max_model_len)
        install_job_api(app, store, cfg, fingerprint)
        await init_app_state(client, app.state, args, supported_tasks)
        adapter = AsyncEngineAdapter(client, asyncio.get_running_loop(), fingerprint,
                                     max_model_len, on_tokens=metrics.offline_tokens)
        pump = OfflinePump(store, adapter, cfg.offline_run_config, cfg.output_dir,
                           on_progress=metrics.job_progress,
                           label=f"serve {cfg.host}:{cfg.port}", model=engine_cfg.model_name)
        # NOTE: vLLM's app has built its middleware stack already; ours wraps it from outside.
        asgi_app = OnlinePriorityMiddleware(app, metrics, arrivals)
        server = DrainingServer(uvicorn.Config(asgi_app, host=cfg.host, port=cfg.port,
                                                log_level="warning", timeout_graceful_shutdown=30))
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, _on_stop_signal, server, pump)
        if cfg.policy != "online-only":
            pump.start()
        watcher = RefitWatcher(refit_state, store, profile.key if profile else None)
        polling = [asyncio.create_task(watcher.run(REFIT_POLL_S)),
                   asyncio.create_task(CheckpointWatcher(checkpoint_state).run(REFIT_POLL_S))]
        try:
            await server.serve()
        finally:
            for task in polling:
                task.cancel()
            watcher.poll()  # NOTE: the last refit the engine wrote is stored too
            # NOTE: uvicorn has stopped accepting and drained online requests by now; the pump
            # admits nothing new and returns its in-flight items to pending before the
            # engine shuts down.
            await asyncio.get_running_loop().run_in_executor(None, pump.stop)


class DrainingServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # NOTE: uvicorn re-raises a captured SIGTERM once it has served, which would kill the
        # process before the pump gives its items back; `_serve` handles the signals itself.
        yield


def _on_stop_signal(server, pump) -> None:
    pump.request_stop()  # no new offline work from now on
    server.should_exit = True  # uvicorn stops accepting and lets online requests finish


class OnlinePriorityMiddleware:
    """Forces priority 0 on online routes, times TTFT/TBT of their streamed responses, and
    stamps each online arrival on `arrivals` (layer-wise preemption)."""

    def __init__(self, app, metrics, arrivals: ArrivalSignal | None = None):
        self.app, self.metrics, self.arrivals = app, metrics, arrivals

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ONLINE_ROUTES:
            return await self.app(scope, receive, send)
        if self.arrivals is not None:
            self.arrivals.stamp()  # NOTE: first thing: the engine may cut an offline step now
        body = await _read_body(receive)
        streaming = False
        try:
            payload = json.loads(body or b"{}")
            payload["priority"] = ONLINE_PRIORITY  # NOTE: clients cannot jump ahead of or behind online work
            streaming = bool(payload.get("stream"))
            body = json.dumps(payload).encode()
        except (ValueError, TypeError, AttributeError):
            pass  # let vLLM answer malformed JSON with its own 400
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        timer = self.metrics.start_online()

        async def timed_send(message):
            # NOTE: only streamed responses show TTFT and TBT; a plain response is one chunk.
            if streaming and message["type"] == "http.response.body" and message.get("more_body"):
                timer.chunk()
            await send(message)

        await self.app(scope, replay, timed_send)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)
