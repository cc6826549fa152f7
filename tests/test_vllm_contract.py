"""The vLLM 0.32.0 and lm-eval 0.4.13 names conserve-bench relies on, checked without an engine.

When an upgrade moves one of them, this fails first and says which.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version


def test_pinned_versions():
    assert version("lm-eval") == "0.4.13"
    vllm_version = __import__("vllm").__version__
    assert vllm_version.startswith("0.32.0"), vllm_version


def test_vllm_offline_engine_names():
    from vllm import LLM, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    for name in ("add_request", "step", "abort_request", "has_unfinished_requests", "get_tokenizer"):
        assert callable(getattr(LLMEngine, name, None)), f"LLMEngine.{name} moved"
    assert "priority" in inspect.signature(LLMEngine.add_request).parameters
    assert "llm_engine" in inspect.getsource(LLM.__init__)
    fields = SamplingParams.__dataclass_fields__ if hasattr(SamplingParams, "__dataclass_fields__") \
        else SamplingParams.__struct_fields__
    for name in ("logprob_token_ids", "prompt_logprobs", "max_tokens", "stop", "temperature"):
        assert name in fields, f"SamplingParams.{name} moved"


def test_vllm_request_error_names():
    """A refused request raises a client error; only EngineDeadError means the engine died."""
    from vllm.exceptions import VLLMClientError, VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    assert issubclass(VLLMValidationError, VLLMClientError)
    assert "except EngineDeadError" in inspect.getsource(AsyncLLM.generate)
    assert not issubclass(EngineDeadError, VLLMClientError)


def test_vllm_context_length_names():
    """max_model_len=-1 auto-fits (the model's maximum, capped by the KV cache) and the
    frontend learns the fitted value; the model's own maximum stays one call away."""
    from vllm.config import ModelConfig
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.core_client import MPClient

    assert ModelConfig.__pydantic_fields__["max_model_len"].metadata[0].ge == -1
    assert callable(ModelConfig.get_and_verify_max_len)
    assert callable(kv_cache_utils._auto_fit_max_model_len)
    assert "max_model_len" in inspect.getsource(MPClient._apply_ready_response)
    assert "timeout" in inspect.signature(MPClient.shutdown).parameters


def test_vllm_output_names():
    from vllm.outputs import CompletionOutput, RequestOutput

    params = inspect.signature(RequestOutput.__init__).parameters
    for name in ("request_id", "prompt_token_ids", "prompt_logprobs", "outputs", "finished"):
        assert name in params, f"RequestOutput.{name} moved"
    for name in ("token_ids", "logprobs", "text"):
        assert name in CompletionOutput.__dataclass_fields__, f"CompletionOutput.{name} moved"


def test_lm_eval_names():
    from lm_eval.api.model import LM, TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: F401

    import lm_eval.tasks.manager as manager

    assert hasattr(TaskFactory, "_load_full_config")
    # NOTE: taskspec's index cache swaps this module global while a TaskManager is built
    assert "TaskIndex()" in inspect.getsource(TaskManager.__init__)
    assert list(inspect.signature(manager.TaskIndex.build).parameters)[0] == "paths"
    assert "_factory" in inspect.getsource(TaskManager.__init__)
    assert "custom_dataset" in inspect.getsource(__import__("lm_eval.api.task").api.task.ConfigurableTask.download)
    assert hasattr(TemplateLM, "_encode_pair") and hasattr(model_registry, "register")
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        assert getattr(LM, name).__isabstractmethod__, name


def test_vllm_streaming_names():
    """Generations stream new tokens only (DELTA) so they can be saved as partials; closing the
    async stream early (a stop string across a partial's end) aborts the request in vLLM."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    fields = SamplingParams.__dataclass_fields__ if hasattr(SamplingParams, "__dataclass_fields__") \
        else SamplingParams.__struct_fields__
    assert "output_kind" in fields
    assert {"DELTA", "FINAL_ONLY"} <= set(RequestOutputKind.__members__)
    assert inspect.isasyncgenfunction(AsyncLLM.generate)
    source = inspect.getsource(AsyncLLM.generate)
    assert "GeneratorExit" in source and "abort" in source


def test_vllm_cpu_process_layout_names():
    """The CPU build's process layout knobs (`engine.local`): an engine core in the calling
    process when multiprocessing is off, no CPU held back from the model when told none, and
    the environment cache and GC freeze an in-process engine core leaves behind."""
    import vllm.envs as envs
    from vllm.platforms import cpu
    from vllm.utils import ompmultiprocessing
    from vllm.v1.engine import core
    from vllm.v1.engine import core_client
    from vllm.v1.engine.llm_engine import LLMEngine

    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        assert name in envs.environment_variables, f"{name} moved"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in inspect.getsource(LLMEngine.from_engine_args)
    assert "InprocClient" in inspect.getsource(core_client.EngineCoreClient.make_client)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in inspect.getsource(cpu.CpuPlatform.check_and_update_config)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" in inspect.getsource(ompmultiprocessing)
    assert callable(envs.disable_envs_cache)
    source = inspect.getsource(core.EngineCore.__init__)
    assert "enable_envs_cache()" in source and "freeze_gc_heap()" in source


def test_vllm_takes_an_executor_by_import_path_that_the_cpu_build_leaves_alone():
    """`engine.local.executor_backend`: the CPU build rewrites the name "uni" only; vLLM
    resolves an `Executor` subclass's import path, given as a flag or an engine argument."""
    from vllm.platforms import cpu
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    from conserve_bench.engine.local import UNIPROC_EXECUTOR

    assert 'distributed_executor_backend == "uni"' in inspect.getsource(cpu.CpuPlatform.check_and_update_config)
    assert resolve_obj_by_qualname(UNIPROC_EXECUTOR) is UniProcExecutor
    assert "resolve_obj_by_qualname(distributed_executor_backend)" in inspect.getsource(Executor.get_class)


def test_vllm_batch_api_names():
    """What `engine.openai_requests` runs a batch line with (docs/vllm-contract.md#batch-api)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest  # noqa: F401
    from vllm.entrypoints.serve import create_error_response  # noqa: F401
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.sampling_params import RequestOutputKind

    assert list(inspect.signature(init_app_state).parameters)[:4] == [
        "engine_client", "state", "args", "supported_tasks"]
    from vllm.entrypoints.generate import api_router as generate_state
    from vllm.entrypoints.pooling import factories as pooling_state

    for attribute, module in (("openai_serving_chat", generate_state),
                              ("openai_serving_completion", generate_state),
                              ("serving_embedding", pooling_state)):
        assert f"state.{attribute} =" in inspect.getsource(module), attribute
    for handler, prefix in ((OpenAIServingChat, "chatcmpl-"), (OpenAIServingCompletion, "cmpl-")):
        source = inspect.getsource(inspect.getmodule(handler))
        assert f'f"{prefix}{{self._base_request_id(raw_request, request.request_id)}}"' in source
        assert "self.engine_client.generate(" in source and "priority=" in source
    for model in (ChatCompletionRequest, CompletionRequest):
        assert "request_id" in model.model_fields
        params = model.model_validate({"model": "m", "prompt": "x", "messages": [], "max_tokens": 4}
                                      ).to_sampling_params(4, {})
        assert params.output_kind == RequestOutputKind.FINAL_ONLY
        for name in ("n", "stop", "logprobs", "prompt_logprobs", "temperature", "seed",
                     "presence_penalty", "frequency_penalty", "bad_words", "max_tokens",
                     "min_tokens", "skip_special_tokens", "stream_interval"):
            assert hasattr(params, name), name
    assert RequestOutputKind.DELTA
    assert "code" in ErrorResponse.model_fields["error"].annotation.model_fields
