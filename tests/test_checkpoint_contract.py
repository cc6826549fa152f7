"""The vLLM 0.32.0 names incremental KV checkpointing relies on, checked without an engine.

docs/vllm-contract.md lists them (the connector and its scheduler half, the host pool); an
upgrade that moves one fails here first, saying which. The claims the
connector makes about vLLM's own `OffloadingConnector` are pinned here too.
"""

from __future__ import annotations

import inspect


def source(obj) -> str:
    return inspect.getsource(obj)


def test_the_scheduler_asks_for_external_tokens_only_at_admission_and_loads_them_synchronously():
    from vllm.v1.core.sched.scheduler import Scheduler

    schedule = source(Scheduler.schedule)
    lookup = schedule.index("if request.num_computed_tokens == 0:")
    ask = schedule.index("self.connector.get_num_new_matched_tokens(")
    assert lookup < ask
    assert "request, block_aligned_local" in schedule[ask:ask + 120]  # vLLM's own hit, aligned
    assert "if request.skip_reading_prefix_cache:\n                            ext_tokens, load_kv_async = 0, False" in schedule
    assert "self.connector.update_state_after_alloc(" in schedule
    assert "self.kv_cache_manager.get_blocks(request_id)" in schedule
    assert "num_external_computed_tokens,\n                    )" in schedule
    assert "has_sync_kv_loads = True" in schedule  # a synchronous load: before the forward pass
    assert "preempted_req_ids=self.reset_preempted_req_ids" in schedule
    assert "scheduler_output.kv_connector_metadata = meta" in schedule


def test_the_model_runner_loads_before_a_forward_with_sync_loads_and_flushes_before_zeroing():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    lifecycle = source(KVConnectorModelRunnerMixin._get_kv_connector_output)
    assert "start_after_forward = not scheduler_output.has_sync_kv_loads" in lifecycle
    assert lifecycle.index("kv_connector.start_load_kv(") < lifecycle.index("yield output")
    execute = source(GPUModelRunner.execute_model)
    # NOTE: a preempted request's blocks are zeroed or written only after the flush
    assert execute.index(".handle_preemptions(kv_connector_metadata)") < execute.index(
        "self._update_states(scheduler_output)")
    assert "self._zero_block_ids(scheduler_output.new_block_ids_to_zero)" in source(
        GPUModelRunner._update_states)
    assert "kv_transfer_group.register_kv_caches(kv_caches)" in source(GPUModelRunner.initialize_kv_cache)


def test_the_cpu_kv_cache_indexes_blocks_on_its_first_dimension():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from vllm.v1.kv_cache_interface import KVCacheLayout

    # NOTE: per layer [blocks, heads, tokens, channels] (the L, one tensor per layer, is the
    # dict vLLM registers); the engine test checks that loaded blocks give the same outputs
    assert CPUAttentionBackend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert "kv[block_id].zero_()" in source(CPUModelRunner._zero_block_ids)


def test_request_and_cache_config_fields():
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheTensor
    from vllm.v1.request import Request
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    for name in ("preempted_req_ids", "num_scheduled_tokens", "scheduled_new_reqs",
                 "scheduled_cached_reqs", "has_sync_kv_loads"):
        assert name in SchedulerOutput.__dataclass_fields__, name
    for name in ("req_id", "num_computed_tokens"):
        assert name in NewRequestData.__dataclass_fields__, name
    for name in ("req_ids", "num_computed_tokens"):
        assert name in CachedRequestData.__dataclass_fields__, name
    for name in ("num_blocks", "kv_cache_tensors", "kv_cache_groups"):
        assert name in KVCacheConfig.__dataclass_fields__, name
    assert "size" in KVCacheTensor.__dataclass_fields__
    assert "block_size" in FullAttentionSpec.__dataclass_fields__
    assert callable(KVCacheBlocks.get_block_ids) and callable(KVCacheManager.get_block_ids)
    init = source(Request.__init__)
    for name in ("self.request_id", "self.priority", "self.arrival_time",
                 "self.skip_reading_prefix_cache", "self.num_computed_tokens"):
        assert name in init, name
    assert isinstance(Request.num_tokens, property)
    assert "self._kv_cache_manager = kv_cache_manager" in source(KVConnectorBase_V1.bind_kv_cache_manager)
    assert "self._kv_cache_config = kv_cache_config" in source(KVConnectorBase_V1.__init__)
    assert list(inspect.signature(KVConnectorBase_V1.request_finished).parameters) == [
        "self", "request", "block_ids"]
    assert list(inspect.signature(KVConnectorBase_V1.handle_preemptions).parameters) == [
        "self", "kv_connector_metadata"]


def test_a_finished_request_is_reported_to_the_connector():
    from vllm.v1.core.sched.scheduler import Scheduler

    assert "self.connector.request_finished(" in inspect.getsource(Scheduler)


def test_vllms_offloading_connector_is_cuda_only_and_stores_what_an_abandoned_step_wrote():
    """The reasons, given in `vllm_plugin.connector`, why it is no substitute."""
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.worker import (
        OffloadingConnectorWorker)
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
        OffloadingConnector)
    from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

    assert "only supported on CUDA-alike" in source(CPUOffloadingSpec.get_worker)
    assert "self.connector_worker.prepare_store_kv(self._connector_metadata)" in source(
        OffloadingConnector.wait_for_save)
    prepare = source(OffloadingConnectorWorker.prepare_store_kv)
    assert "for job_id, entry in metadata.store_jobs.items():" in prepare  # every job, no check
