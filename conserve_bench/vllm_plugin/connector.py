"""ConserveConnector: ConServe's one plug into vLLM's KV-connector API, the class vLLM loads.

It carries layer-wise preemption and incremental KV checkpointing (vLLM loads one connector),
laid out as vLLM's own connectors are: this class checks the requirements and hands every
call to its scheduler half (`connector_scheduler.ConnectorScheduler`: numbers and arms steps,
keeps the checkpoint book, plans each step's copies) or its worker half (`connector_worker.
ConnectorWorker`: the layer safepoints, the host pool's copies). Its settings are
`overrides.ConnectorConfig`. It never blocks a step that is not armed, and never decides
policy. vLLM names relied on: docs/vllm-contract.md#connector.

NOTE: why not vLLM's own `OffloadingConnector` (`kv_connector="OffloadingConnector"`), which
also copies KV blocks to host memory: in 0.32.0 its CPU backend refuses to run anywhere but
CUDA-alike and XPU devices (`kv_offload/cpu/spec.py`, `CPUOffloadingSpec.get_worker`), and it
stores blocks by prefix hash from `wait_for_save`, which vLLM calls in a `finally` even for a
step our safepoint abandoned (`offloading_connector.py` -> `prepare_store_kv` queues every
store job of the step): a half-written block would be kept, and later loaded, under a valid
hash. Ours saves only steps that ran to the end, and only offline requests' blocks.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from conserve_bench.sched.kv_checkpoints import pool_slots
from conserve_bench.vllm_plugin.connector_scheduler import ConnectorScheduler
from conserve_bench.vllm_plugin.connector_worker import ConnectorWorker
from conserve_bench.vllm_plugin.overrides import (SCHEDULER_CLS, WORKER_CLS, LayerPreemptionError,
                                                  connector_config)
from conserve_bench.vllm_plugin.safepoints import AbortReport, RunOutReport, StepMeta


class ConserveConnector(KVConnectorBase_V1):
    """The KV connector vLLM loads by `kv_connector_module_path` (see `ConnectorConfig`)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.config = connector_config(self._kv_transfer_config.kv_connector_extra_config)
        check_requirements(vllm_config, kv_cache_config)
        num_pool_slots = (pool_slots(self.config.checkpoint_gib, _block_bytes(kv_cache_config))
                          if kv_cache_config is not None else 0)
        self.connector_scheduler = (
            ConnectorScheduler(self.config, num_pool_slots, _block_size(kv_cache_config),
                               _block_bytes(kv_cache_config))
            if role == KVConnectorRole.SCHEDULER else None)
        self.connector_worker = (ConnectorWorker(self.config, _num_layers(kv_cache_config), num_pool_slots)
                                 if role == KVConnectorRole.WORKER else None)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # NOTE: nothing is handed off: checkpoints are a best-effort cache

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # NOTE: a full CUDA graph replays past the per-layer hook, which would leave an armed
        # step no safepoint; vLLM then captures piecewise graphs for every step. KV checkpoints
        # alone copy before and after the forward pass: full graphs stay.
        return connector_config(extra_config).layer_preemption

    # -- scheduler side ------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output) -> StepMeta:
        return self.connector_scheduler.build_meta(scheduler_output, self._kv_cache_manager)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        # NOTE: synchronous (False): the load runs in this step, before its forward pass.
        return self.connector_scheduler.num_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.connector_scheduler.admitted(request, blocks.get_block_ids()[0], num_external_tokens)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.connector_scheduler.release(request.request_id)
        return False, None

    # -- worker side ---------------------------------------------------------------------------

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self.connector_worker.begin_step(connector_metadata)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self.connector_worker.after_layer()

    def wait_for_save(self) -> None:
        self.connector_worker.end_step()

    def build_connector_worker_meta(self) -> AbortReport | RunOutReport | None:
        return self.connector_worker.report if self.connector_worker is not None else None

    def register_kv_caches(self, kv_caches) -> None:
        self.connector_worker.register_kv_caches(kv_caches, self._kv_cache_config.num_blocks)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self.connector_worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self.connector_worker.start_load_kv()

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
    from conserve_bench.vllm_plugin.scheduler import ConserveScheduler

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
