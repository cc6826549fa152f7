"""ConserveConnector: ConServe's one plug into vLLM's KV-connector API.

Today it carries layer-wise preemption; incremental KV checkpointing is to join this same class
(vLLM loads one connector), through the load/save hooks left as no-ops here. Scheduler side:
numbers the steps, and `arm` marks a step abandonable with the time after which an online
arrival cuts it. Worker side: `save_kv_layer`, called after every attention layer, counts
layers; every k-th is a safepoint (`Safepoints`) that raises `StepAborted` when the step is
armed and an arrival came later. `worker.PreemptibleWorker` catches it. It never blocks a
step that is not armed, and never moves KV.

vLLM 0.32.0 names relied on (tests/test_preemption_contract.py pins them):
`KVConnectorBase_V1` (`__init__(vllm_config, role, kv_cache_config)`, `_kv_transfer_config`,
`bind_connector_metadata`, `clear_connector_metadata`, `_get_connector_metadata`,
`save_kv_layer`, `wait_for_save`, `build_connector_meta`, `build_connector_worker_meta`,
`requires_kv_delivery`, `requires_piecewise_for_cudagraph`, the other abstract methods as
no-ops), `KVConnectorMetadata`, `KVConnectorWorkerMetadata.aggregate`, `KVConnectorRole`,
`KVTransferConfig` (`kv_connector`, `kv_connector_module_path`, `kv_role`,
`kv_connector_extra_config`), `maybe_transfer_kv_layer` (calls `save_kv_layer` after each
attention layer while metadata is bound, at run time: the attention op is a custom op, opaque
to torch.compile), `SchedulerOutput.kv_connector_metadata`, `VllmConfig` (`scheduler_config.
async_scheduling`, `.scheduler_cls`, `speculative_config`, `parallel_config.tensor_parallel_size`,
`.pipeline_parallel_size`, `.worker_cls`, `use_v2_model_runner`), `KVCacheConfig.kv_cache_groups`
(`layer_names`, `kv_cache_spec`), `FullAttentionSpec`, `MLAAttentionSpec`,
`vllm.platforms.current_platform` (`is_cpu`, `is_cuda_alike`), `torch.cuda.Event(blocking=)`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from conserve_bench.engine.arrivals import ArrivalSignal, SharedInt
from conserve_bench.engine.plugin import CONNECTOR_MODULE, SCHEDULER_CLS, WORKER_CLS
from conserve_bench.errors import ConserveError
from conserve_bench.sched.policy import SAFEPOINT_EVERY

CONNECTOR_NAME = "ConserveConnector"


class LayerPreemptionError(ConserveError, ValueError):
    """A configuration layer-wise preemption cannot run under (one requirement per message)."""


@dataclass(frozen=True)
class ConnectorConfig:
    """`kv_connector_extra_config["conserve"]`: plain JSON, validated once in every process."""

    safepoint_every: int = SAFEPOINT_EVERY
    arrival_path: str | None = None  # ArrivalSignal file; None: no arrival ever aborts
    # Test-only: a SharedInt file; while it holds L > 0, every armed step is cut at the
    # safepoint at (or after) layer L the first time its work is attempted.
    test_abort_path: str | None = None

    def __post_init__(self):
        if not (isinstance(self.safepoint_every, int) and self.safepoint_every >= 1):
            raise LayerPreemptionError(f"--safepoint-every must be >= 1, got {self.safepoint_every!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectorConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LayerPreemptionError(f"unknown connector settings: {', '.join(sorted(unknown))}")
        return cls(**data)

    def engine_overrides(self) -> dict[str, Any]:
        """`EngineConfig` fields that load this connector with this config, with what it needs
        (`check_requirements`); the scheduler comes from `ConserveScheduler`'s own settings."""
        kv_transfer_config = {
            "kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both", "kv_connector_extra_config": {"conserve": dataclasses.asdict(self)}}
        return {"kv_transfer_config": kv_transfer_config, "worker_cls": WORKER_CLS,
                "async_scheduling": False}


@dataclass
class StepMeta(KVConnectorMetadata):
    """What the worker learns about a step from the scheduler."""

    step_index: int  # steps numbered by the scheduler-side connector, from 1
    abort_after_ns: int | None = None  # armed: arrivals stamped later cut it; None: never cut
    forced_abort_layer: int | None = None  # test-only: cut at this layer's safepoint


@dataclass
class AbortReport(KVConnectorWorkerMetadata):
    """A step the worker abandoned, sent back with its empty output."""

    step_index: int
    layer: int  # attention layers completed when it stopped
    num_layers: int
    arrival_ns: int  # the arrival that cut it (0 when the test trigger did)
    aborted_at_ns: int
    layer_group_s: float  # how long the layer group that ended at the safepoint took

    @property
    def arrival_to_abort_s(self) -> float | None:
        return (self.aborted_at_ns - self.arrival_ns) / 1e9 if self.arrival_ns else None

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        return self  # NOTE: one worker: tensor and pipeline parallel size 1 are requirements


class StepAborted(Exception):
    def __init__(self, report: AbortReport):
        super().__init__(f"step {report.step_index} abandoned at layer {report.layer}")
        self.report = report


class Event(Protocol):
    def record(self) -> None: ...
    def synchronize(self) -> None: ...


class RunAheadBound:
    """Keeps the CPU at most one layer group ahead of the device (CUDA only).

    CUDA kernels launch asynchronously: without a bound the CPU would pass every safepoint
    while the device is still on the first layers, and an abort would cut nothing. At each
    safepoint it records an event and waits for the one recorded at the safepoint before.
    Two events alternate: one is recorded while the other is waited on.
    """

    def __init__(self, events: tuple[Event, Event]):
        self._events = events
        self._num_recorded = 0

    def at_safepoint(self) -> None:
        self._events[self._num_recorded % 2].record()
        if self._num_recorded:
            self._events[(self._num_recorded - 1) % 2].synchronize()
        self._num_recorded += 1

    def drain(self) -> None:
        """Wait for everything launched so far (before the step's buffers are reused)."""
        if self._num_recorded:
            self._events[(self._num_recorded - 1) % 2].synchronize()

    def reset(self) -> None:
        self._num_recorded = 0


class Safepoints:
    """The worker's per-step layer count, and the decision taken at every k-th layer."""

    def __init__(self, every: int, num_layers: int, read_arrival: Callable[[], int],
                 bound: RunAheadBound | None = None, clock: Callable[[], int] = time.monotonic_ns):
        self.every, self.num_layers = every, num_layers
        self._read_arrival, self._bound, self._clock = read_arrival, bound, clock
        self.meta: StepMeta | None = None
        self.report: AbortReport | None = None
        self._layer = 0
        self._group_started_ns = 0

    def begin(self, meta: StepMeta) -> None:
        self.meta, self.report, self._layer = meta, None, 0
        self._group_started_ns = self._clock()

    def after_layer(self) -> None:
        self._layer += 1
        if self._layer % self.every == 0 and self._layer < self.num_layers:
            self._safepoint()

    def end(self) -> None:
        if self._bound is not None:
            self._bound.reset()

    def _safepoint(self) -> None:
        if self._bound is not None:
            self._bound.at_safepoint()
        now = self._clock()
        group_s, self._group_started_ns = (now - self._group_started_ns) / 1e9, now
        meta = self.meta
        if meta is None or meta.abort_after_ns is None:
            return
        arrival = self._read_arrival()
        forced = meta.forced_abort_layer is not None and self._layer >= meta.forced_abort_layer
        if arrival > meta.abort_after_ns or forced:
            if self._bound is not None:
                self._bound.drain()  # NOTE: vLLM reuses pinned input buffers next step
            self.report = AbortReport(meta.step_index, self._layer, self.num_layers,
                                      arrival if arrival > meta.abort_after_ns else 0,
                                      self._clock(), group_s)
            raise StepAborted(self.report)


class ConserveConnector(KVConnectorBase_V1):
    """The KV connector vLLM loads by `kv_connector_module_path` (see `ConnectorConfig`)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.config = ConnectorConfig.from_dict(extra.get("conserve", {}))
        check_requirements(vllm_config, kv_cache_config)
        self._arrivals = ArrivalSignal(self.config.arrival_path) if self.config.arrival_path else None
        self._test_abort = (SharedInt(self.config.test_abort_path)
                            if self.config.test_abort_path else None)
        self._num_steps = 0
        self._attempted: set[tuple] = set()  # test trigger: work already cut once
        self.safepoints = (Safepoints(self.config.safepoint_every, _num_layers(kv_cache_config),
                                      self.last_arrival_ns, _run_ahead_bound())
                           if role == KVConnectorRole.WORKER else None)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # NOTE: nothing is handed off: a preempted request just recomputes

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # NOTE: a full CUDA graph replays past the per-layer hook: no safepoints

    def last_arrival_ns(self) -> int:
        return self._arrivals.last_arrival_ns() if self._arrivals is not None else 0

    # -- scheduler side ------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output) -> StepMeta:
        self._num_steps += 1
        return StepMeta(self._num_steps)

    def arm(self, scheduler_output, abort_after_ns: int) -> None:
        """Let this step be abandoned at a safepoint if an arrival is stamped after
        `abort_after_ns` (called by the scheduler on offline-only steps, after scheduling)."""
        meta = scheduler_output.kv_connector_metadata
        scheduler_output.kv_connector_metadata = dataclasses.replace(
            meta, abort_after_ns=abort_after_ns, forced_abort_layer=self._test_layer(scheduler_output))

    def _test_layer(self, scheduler_output) -> int | None:
        layer = self._test_abort.read() if self._test_abort is not None else 0
        if layer <= 0:
            return None
        work = _work_signature(scheduler_output)
        if work in self._attempted:
            return None
        self._attempted.add(work)
        return layer

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    # -- worker side ---------------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self.safepoints.begin(connector_metadata)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self.safepoints.after_layer()

    def wait_for_save(self) -> None:
        # NOTE: vLLM calls this for an abandoned step too (from a `finally`): anything saved
        # here (incremental checkpoints) must skip a step whose `safepoints.report` is set.
        self.safepoints.end()

    def build_connector_worker_meta(self) -> AbortReport | None:
        return self.safepoints.report if self.safepoints is not None else None

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None


def check_requirements(vllm_config, kv_cache_config=None) -> None:
    """Raise `LayerPreemptionError` naming the first requirement `vllm_config` breaks."""
    from vllm.platforms import current_platform

    scheduler, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    problems = (
        (scheduler.async_scheduling,
         "async scheduling is on: the next step would be scheduled before this one can be "
         "abandoned; start vLLM with async_scheduling=False"),
        (vllm_config.speculative_config is not None,
         "speculative decoding is on: a step's draft tokens cannot be rolled back"),
        (parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1,
         "tensor and pipeline parallel size must be 1: every worker would have to stop "
         "at the same layer"),
        (not current_platform.is_cpu() and vllm_config.use_v2_model_runner,
         "vLLM chose its V2 model runner: set VLLM_USE_V2_MODEL_RUNNER=0"),
        (parallel.worker_cls != WORKER_CLS,
         f"the connector needs worker_cls={WORKER_CLS}, which catches an abandoned step"),
        (not _is_conserve_scheduler(scheduler.scheduler_cls),
         f"the connector needs scheduler_cls={SCHEDULER_CLS}, which rolls a step back"),
        (kv_cache_config is not None and not _one_full_attention_group(kv_cache_config),
         "the model must have one full-attention KV cache group (no sliding window, no "
         "Mamba state): only full-attention KV can be rolled back by block"),
    )
    for broken, message in problems:
        if broken:
            raise LayerPreemptionError(f"layer-wise preemption: {message}")


def _is_conserve_scheduler(scheduler_cls) -> bool:
    from conserve_bench.sched.scheduler import ConserveScheduler

    return scheduler_cls == SCHEDULER_CLS or (isinstance(scheduler_cls, type)
                                              and issubclass(scheduler_cls, ConserveScheduler))


def _one_full_attention_group(kv_cache_config) -> bool:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    # NOTE: exact types: subclasses such as RSWASpec free blocks a rollback would need again
    return len(groups) == 1 and type(groups[0].kv_cache_spec) in (FullAttentionSpec, MLAAttentionSpec)


def _num_layers(kv_cache_config) -> int:
    return len(kv_cache_config.kv_cache_groups[0].layer_names)


def _run_ahead_bound() -> RunAheadBound | None:
    """Events on CUDA; none on the CPU, where every layer has finished when its hook runs."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return None
    import torch

    return RunAheadBound((torch.cuda.Event(blocking=True), torch.cuda.Event(blocking=True)))


def _work_signature(scheduler_output) -> tuple:
    """The requests of a step and where each starts: a rolled-back step retried has the same."""
    new = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
    cached = scheduler_output.scheduled_cached_reqs
    return tuple(sorted(new + list(zip(cached.req_ids, cached.num_computed_tokens))))
