"""ConserveConnector: ConServe's one plug into vLLM's KV-connector API.

It carries layer-wise preemption and incremental KV checkpointing (vLLM loads one connector).
Layer-wise preemption, scheduler side: numbers the steps, and `arm` marks a step abandonable
with the time after which an online arrival cuts it. Worker side: `save_kv_layer`, called
after every attention layer, counts layers; every k-th is a safepoint (`safepoints.
Safepoints`) that raises `StepAborted` when the step is armed and an arrival came later.
`worker.PreemptibleWorker` catches it. It never blocks a step that is not armed.
Checkpointing (`--kv-checkpoint-gib`): the scheduler side (`checkpoints.Checkpoints`) keeps
`sched.checkpoint.CheckpointBook` (which blocks of which offline request are on the host)
and puts each step's copies in its metadata; the worker side copies them (`kvpool.HostPool`):
loads before the forward pass, saves after a step that ran to the end, a flush before
preempted blocks are reused. A preempted request's checkpointed prefix is reported to vLLM as externally matched
tokens, so only the rest is computed again.

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
Checkpointing adds (tests/test_checkpoint_contract.py pins them): `KVConnectorBase_V1`
(`get_num_new_matched_tokens(request, num_computed_tokens)` called only for a request with no
computed tokens, with vLLM's block-aligned prefix-cache hit, and honoured synchronously when
it returns `(n, False)` (`SchedulerOutput.has_sync_kv_loads` then makes `start_load_kv` run
before the forward pass), `update_state_after_alloc(request, blocks, num_external_tokens)`
with `KVCacheBlocks.get_block_ids`, `register_kv_caches`, `handle_preemptions(metadata)`
called before the step's blocks are zeroed or written, `request_finished(request,
block_ids)`, `bind_kv_cache_manager` setting `_kv_cache_manager` (`get_block_ids`),
`_kv_cache_config`), `SchedulerOutput` (`preempted_req_ids`, `num_scheduled_tokens`,
`scheduled_new_reqs` (`req_id`, `num_computed_tokens`), `scheduled_cached_reqs`
(`req_ids`, `num_computed_tokens`: both before the step)), `Request` (`request_id`,
`priority`, `arrival_time`, `num_tokens`, `sampling_params.prompt_logprobs`,
`skip_reading_prefix_cache`), `KVCacheConfig` (`num_blocks`, `kv_cache_tensors` (`size`)),
`FullAttentionSpec.block_size`.

NOTE: why not vLLM's own `OffloadingConnector` (`kv_connector="OffloadingConnector"`), which
also copies KV blocks to host memory: in 0.32.0 its CPU backend refuses to run anywhere but
CUDA-alike and XPU devices (`kv_offload/cpu/spec.py`, `CPUOffloadingSpec.get_worker`), and it
stores blocks by prefix hash from `wait_for_save`, which vLLM calls in a `finally` even for a
step our safepoint abandoned (`offloading_connector.py` -> `prepare_store_kv` queues every
store job of the step): a half-written block would be kept, and later loaded, under a valid
hash. Ours saves only steps that ran to the end, and only offline requests' blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from conserve_bench.engine.arrivals import ArrivalSignal, SharedInt
from conserve_bench.engine.checkpoints import Checkpoints
from conserve_bench.engine.plugin import CONNECTOR_MODULE, SCHEDULER_CLS, WORKER_CLS
from conserve_bench.engine.safepoints import AbortReport, RunAheadBound, Safepoints, StepMeta
from conserve_bench.errors import ConserveError
from conserve_bench.sched.checkpoint import pool_slots
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
    checkpoint_gib: float = 0.0  # the host pool for KV checkpoints; 0: no checkpoints
    checkpoint_state_path: str | None = None  # the pool's use, as JSON, for `/metrics`
    # Test-only: a SharedInt file; while it holds N > 0, the pool holds at most N - 1 blocks.
    test_pool_blocks_path: str | None = None

    def __post_init__(self):
        if not (isinstance(self.safepoint_every, int) and self.safepoint_every >= 1):
            raise LayerPreemptionError(f"--safepoint-every must be >= 1, got {self.safepoint_every!r}")
        if not (isinstance(self.checkpoint_gib, (int, float)) and self.checkpoint_gib >= 0):
            raise LayerPreemptionError(f"--kv-checkpoint-gib must be >= 0, got {self.checkpoint_gib!r}")

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
        self._num_pool_slots = (pool_slots(self.config.checkpoint_gib, _block_bytes(kv_cache_config))
                                if kv_cache_config is not None else 0)
        self.checkpoints = (Checkpoints(self.config, self._num_pool_slots,
                                        _block_size(kv_cache_config), _block_bytes(kv_cache_config))
                            if role == KVConnectorRole.SCHEDULER else None)
        self.pool = None  # worker side: the host pool, once vLLM registers its KV caches

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # NOTE: nothing is handed off: checkpoints are a best-effort cache

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # NOTE: a full CUDA graph replays past the per-layer hook: no safepoints

    def last_arrival_ns(self) -> int:
        return self._arrivals.last_arrival_ns() if self._arrivals is not None else 0

    # -- scheduler side ------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output) -> StepMeta:
        self._num_steps += 1
        return self.checkpoints.step_meta(self._num_steps, scheduler_output, self._kv_cache_manager)

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
        # NOTE: synchronous (False): the load runs in this step, before its forward pass.
        return self.checkpoints.num_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.checkpoints.admitted(request, blocks.get_block_ids()[0], num_external_tokens)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.checkpoints.release(request.request_id)
        return False, None

    def step_finished(self, ran: bool) -> None:
        """The step last planned came back (called by `ConserveScheduler` before vLLM reads
        it): commit its checkpoints if it `ran` to the end, else drop them."""
        self.checkpoints.step_finished(ran)

    # -- worker side ---------------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self.safepoints.begin(connector_metadata)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self.safepoints.after_layer()

    def wait_for_save(self) -> None:
        # NOTE: vLLM calls this for an abandoned step too (from a `finally`): its KV is half
        # written, so it is never saved (the scheduler side drops its slots).
        meta = self.safepoints.meta
        if self.pool is not None and meta is not None and meta.saves and self.safepoints.report is None:
            self.pool.save(*zip(*meta.saves))
        self.safepoints.end()

    def build_connector_worker_meta(self) -> AbortReport | None:
        return self.safepoints.report if self.safepoints is not None else None

    def register_kv_caches(self, kv_caches) -> None:
        if self._num_pool_slots:
            from conserve_bench.engine.kvpool import HostPool

            self.pool = HostPool(kv_caches, self._num_pool_slots, self._kv_cache_config.num_blocks)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.pool is not None and kv_connector_metadata.flush:
            self.pool.flush()

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self.safepoints.meta
        if self.pool is not None and meta is not None and meta.loads:
            self.pool.load(*zip(*meta.loads))

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


def _block_size(kv_cache_config) -> int:
    return kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size


def _block_bytes(kv_cache_config) -> int:
    """Bytes of one KV block across every layer (what one pool slot holds): the scheduler and
    the worker both size the pool in slots from it."""
    return sum(t.size for t in kv_cache_config.kv_cache_tensors) // kv_cache_config.num_blocks


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
