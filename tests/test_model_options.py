"""How the model is loaded (`config.ModelOptions`, lm-eval `vllm`'s model_args): checked once,
stored with a job, handed to vLLM, and the wing's one-worker mechanisms off under tensor
parallelism. No engine starts here."""

from __future__ import annotations

import os

import json
import logging

import pytest

from conserve_bench.config import EngineConfig, JobSpec, ModelOptions

from .conftest import cli
from .test_cli import assert_one_line_error


# -- the options --------------------------------------------------------------------------------


@pytest.mark.parametrize("given, words", [
    ({"dtype": "int8"}, ["--dtype", "int8"]),
    ({"max_model_len": 0}, ["--max-model-len", ">= 1"]),
    ({"max_model_len": 2.5}, ["--max-model-len"]),
    ({"gpu_memory_utilization": 1.5}, ["--gpu-memory-utilization", "(0, 1]"]),
    ({"gpu_memory_utilization": 0}, ["--gpu-memory-utilization"]),
    ({"tensor_parallel_size": 0}, ["--tensor-parallel-size"]),
    ({"tensor_parallel_size": True}, ["--tensor-parallel-size"]),
    ({"revision": " "}, ["--revision"]),
    ({"trust_remote_code": "yes"}, ["--trust-remote-code"]),
    ({"add_bos_token": 1}, ["--add-bos-token"]),
    ({"seed": -1}, ["--seed"]),
])
def test_bad_options_are_refused_in_one_line(given, words):
    with pytest.raises(ValueError) as refused:
        ModelOptions(**given)
    message = str(refused.value)
    assert "\n" not in message and all(word in message for word in words)


def test_dtype_is_spelled_one_way():
    """A fingerprint names the dtype: vLLM's synonyms must not split one engine in two."""
    assert ModelOptions(dtype="half").dtype == "float16"
    assert ModelOptions(dtype="FLOAT").dtype == "float32"
    assert ModelOptions(dtype="BFloat16").dtype == "bfloat16"


def test_auto_dtype_is_float32_on_the_cpu_build_only():
    """vLLM's own `auto` downcasts a float32 model to bfloat16 on its CPU build; ours keeps
    the float32 every score here was measured in. Elsewhere `auto` is vLLM's (the model's)."""
    assert ModelOptions().engine_dtype(on_cpu=True) == "float32"
    assert ModelOptions().engine_dtype(on_cpu=False) == "auto"
    assert ModelOptions(dtype="bfloat16").engine_dtype(on_cpu=True) == "bfloat16"


def test_the_cpu_build_is_told_apart_as_vllm_tells_it():
    from vllm.platforms import current_platform

    from conserve_bench.engine.local import engine_config, is_cpu_build
    from conserve_bench.engine.models import ModelRef

    assert is_cpu_build() == current_platform.is_cpu()
    expected = "float32" if current_platform.is_cpu() else "auto"
    assert engine_config(ModelRef("m", "/m")).dtype == expected


def test_unknown_option_names_are_refused():
    with pytest.raises(ValueError, match="unknown model option 'dtyp'"):
        ModelOptions.from_dict({"dtyp": "float32"})


# -- stored with the job ------------------------------------------------------------------------


OPTIONS = ModelOptions(dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.8,
                       tensor_parallel_size=2, revision="v1.0", trust_remote_code=True,
                       add_bos_token=True, seed=7)


@pytest.mark.parametrize("options", [OPTIONS, ModelOptions()])
def test_a_spec_round_trips_through_the_store_with_its_options(options):
    spec = JobSpec(tasks=("mmlu_anatomy",), limit=3, model_options=options)
    stored = json.loads(json.dumps(spec.to_dict()))  # what the store keeps
    assert stored["model_options"]["dtype"] == options.dtype
    assert JobSpec.from_dict(stored) == spec
    assert JobSpec.from_dict(stored).model_options == options


def test_a_spec_stored_before_model_options_loads_with_the_defaults():
    old = {"tasks": ["mmlu_anatomy"], "model": "smollm2-135m", "limit": 5, "num_fewshot": None,
           "data_dir": None, "gen_kwargs": {}, "seed": 0, "source": "tasks", "samples": None,
           "fingerprint": None}
    spec = JobSpec.from_dict(old)
    assert spec.model_options == ModelOptions() and spec.limit == 5


def test_a_stored_spec_with_a_bad_option_is_refused():
    with pytest.raises(ValueError, match="--dtype"):
        JobSpec.from_dict({"tasks": ["t"], "model_options": {"dtype": "int3"}})


# -- handed to vLLM -----------------------------------------------------------------------------


def test_engine_args_carry_the_options():
    from conserve_bench.engine.local import engine_args

    cfg = EngineConfig.for_model("/models/m", "m", OPTIONS, on_cpu=True)
    args = engine_args(cfg)
    assert args["dtype"] == "bfloat16" and args["max_model_len"] == 2048 and args["seed"] == 7
    assert args["revision"] == "v1.0" and args["trust_remote_code"] is True
    assert args["tensor_parallel_size"] == 2 and args["gpu_memory_utilization"] == 0.8
    assert cfg.add_bos_token is True  # the encoder's, not vLLM's


def test_default_options_leave_vllms_defaults_alone():
    from conserve_bench.engine.local import engine_args

    args = engine_args(EngineConfig.for_model("/models/m", "m", ModelOptions(), on_cpu=True))
    assert args["dtype"] == "float32" and args["max_model_len"] == -1 and args["seed"] == 0
    assert not {"revision", "trust_remote_code", "tensor_parallel_size",
                "gpu_memory_utilization"} & set(args)


def test_engine_overrides_win_over_the_options():
    cfg = EngineConfig.for_model("/m", "m", ModelOptions(max_model_len=4096), on_cpu=True,
                                 max_model_len=1024)
    assert cfg.max_model_len == 1024


def test_serve_hands_vllm_serve_the_same_options():
    from conserve_bench.engine.local import engine_config
    from conserve_bench.engine.models import ModelRef
    from conserve_bench.serve.server import ServeConfig, vllm_cli_args

    cfg = ServeConfig(model_options=OPTIONS)
    flags = vllm_cli_args(cfg, engine_config(ModelRef("m", "/m"), cfg.model_options))
    for flag, value in (("--dtype", "bfloat16"), ("--revision", "v1.0"),
                        ("--tensor-parallel-size", "2"), ("--gpu-memory-utilization", "0.8"),
                        ("--max-model-len", "2048")):
        assert flags[flags.index(flag) + 1] == value
    assert "--trust-remote-code" in flags


# -- deterministic scoring: batch-invariant kernels on GPUs, batched apart on the CPU build -----


def test_deterministic_is_vllms_batch_invariant_mode_off_the_cpu_build(monkeypatch):
    from conserve_bench.config import fingerprint_numerics
    from conserve_bench.engine.local import engine_environment

    options = ModelOptions(deterministic=True, add_bos_token=True)
    gpu = EngineConfig.for_model("/m", "m", options, on_cpu=False)
    cpu = EngineConfig.for_model("/m", "m", options, on_cpu=True)
    assert gpu.batch_invariant and not cpu.batch_invariant  # vLLM's CPU build has no such kernels
    fingerprint = gpu.fingerprint(8192, "w", "0.32.0+cu128")
    assert fingerprint.endswith("|bos|batch-invariant")  # other kernels, other numerics: other items
    assert fingerprint_numerics(fingerprint)["add_bos_token"] is True
    assert "batch-invariant" not in cpu.fingerprint(8192, "w", "0.32.0+cpu")
    # NOTE: set, then deleted: monkeypatch then restores the variable's absence after the test
    # (every engine this suite starts later would otherwise run vLLM's GPU kernels on the CPU)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    monkeypatch.delenv("VLLM_BATCH_INVARIANT")
    engine_environment(cpu)
    assert "VLLM_BATCH_INVARIANT" not in os.environ
    engine_environment(gpu)
    assert os.environ["VLLM_BATCH_INVARIANT"] == "1"


def test_serve_deterministic_on_the_cpu_build_batches_offline_apart_under_conserve_only(monkeypatch):
    from conserve_bench.engine.local import engine_config
    from conserve_bench.engine.models import ModelRef
    from conserve_bench.serve import server
    from conserve_bench.serve.server import ServeConfig, ServeConfigError, batches_apart

    monkeypatch.setattr(server, "is_cpu_build", lambda: True)
    cfg = ServeConfig(model_options=ModelOptions(deterministic=True))
    engine_cfg = engine_config(ModelRef("m", "/m"), cfg.model_options)
    assert batches_apart(cfg, engine_cfg) == (not engine_cfg.batch_invariant)
    assert not batches_apart(ServeConfig(), engine_config(ModelRef("m", "/m"), ModelOptions()))
    with pytest.raises(ServeConfigError, match="--deterministic on vLLM's CPU build batches"):
        ServeConfig(policy="priority", model_options=ModelOptions(deterministic=True))
    monkeypatch.setattr(server, "is_cpu_build", lambda: False)
    ServeConfig(policy="priority", model_options=ModelOptions(deterministic=True))  # kernels do it


# -- tensor parallelism: the wing's one-worker mechanisms off, said once ------------------------


def test_tensor_parallelism_turns_the_connector_off_with_a_warning(caplog):
    from conserve_bench.vllm_plugin.overrides import (SCHEDULER_CLS, ConnectorConfig,
                                                      engine_overrides)

    connector = ConnectorConfig(checkpoint_gib=1.0)
    with caplog.at_level(logging.WARNING):
        one = engine_overrides(connector=connector)
        assert not caplog.records
        two = engine_overrides(connector=connector, tensor_parallel_size=2)
    assert one["kv_transfer_config"] and one["worker_cls"]
    assert "kv_transfer_config" not in two and "worker_cls" not in two
    assert two["scheduler_cls"] == SCHEDULER_CLS  # the conserve scheduling policy stays
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "tensor_parallel_size=2" in message
    assert "layer-wise preemption" in message and "KV checkpoints" in message


def test_serve_under_tensor_parallelism_keeps_the_policy_without_preemption_or_checkpoints():
    from conserve_bench.config import ServePolicy
    from conserve_bench.serve.server import ServeConfig, connector_config

    single = ServeConfig(kv_checkpoint_gib=1.0)
    assert single.preempts_layers and single.checkpoint_gib == 1.0
    parallel = ServeConfig(kv_checkpoint_gib=1.0, model_options=ModelOptions(tensor_parallel_size=2))
    assert parallel.policy == ServePolicy.CONSERVE
    assert not parallel.preempts_layers and parallel.checkpoint_gib == 0
    assert connector_config(parallel, None, "state.json") is None


def test_submit_with_checkpoints_under_tensor_parallelism_loads_no_connector(caplog):
    from conserve_bench.cli.jobs import _checkpoint_overrides

    with caplog.at_level(logging.WARNING):
        overrides = _checkpoint_overrides(2.0, tensor_parallel_size=4)
    assert "kv_transfer_config" not in overrides
    assert "tensor_parallel_size=4" in caplog.text


# -- the command line and CI files --------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["submit", "mmlu_anatomy", "--dtype", "int8"], ["--dtype must be one of", "int8"]),
    (["submit", "mmlu_anatomy", "--gpu-memory-utilization", "2"], ["--gpu-memory-utilization", "(0, 1]"]),
    (["submit", "mmlu_anatomy", "--tensor-parallel-size", "0"], ["--tensor-parallel-size", ">= 1"]),
    (["submit", "mmlu_anatomy", "--max-model-len", "0"], ["--max-model-len", ">= 1"]),
    (["serve", "--dtype", "fp8"], ["--dtype must be one of", "fp8"]),
    (["profile", "--gpu-memory-utilization", "0"], ["--gpu-memory-utilization", "(0, 1]"]),
    (["submit", "mmlu_anatomy", "--server", "http://127.0.0.1:9", "--dtype", "bfloat16"],
     ["--server", "own settings", "drop --dtype"]),
])
def test_bad_option_values_are_one_line_usage_errors(args, words):
    assert_one_line_error(cli(*args), *words)


def test_submit_stores_the_options_with_the_job(tmp_path):
    from conserve_bench.store import Store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    queued = cli("submit", "mmlu_anatomy", "--db", url, "--no-wait", "--dtype", "bfloat16",
                 "--max-model-len", "1024", "--add-bos-token", "--revision", "main", "--seed", "3")
    assert queued.returncode == 0, queued.stderr
    (job,) = Store(url).list_jobs()
    assert job.spec.model_options == ModelOptions(dtype="bfloat16", max_model_len=1024,
                                                  add_bos_token=True, revision="main", seed=3)


def write_config(tmp_path, extra: str):
    path = tmp_path / "suite.yaml"
    path.write_text(f"model: smollm2-135m\n{extra}\ntasks:\n  mmlu_anatomy:\n    metrics: [acc]\n")
    return path


def test_a_ci_file_takes_the_model_options_into_its_jobs(tmp_path):
    from conserve_bench.ci.suite import load_config

    path = write_config(tmp_path, "dtype: bfloat16\nmax_model_len: 2048\nadd_bos_token: true")
    cfg = load_config(path, needs_baselines=False)
    expected = ModelOptions(dtype="bfloat16", max_model_len=2048, add_bos_token=True)
    assert cfg.model_options == expected
    assert [spec.model_options for spec in cfg.job_specs()] == [expected]


@pytest.mark.parametrize("extra, key", [("dtype: int8", "dtype"),
                                        ("tensor_parallel_size: 0", "tensor_parallel_size"),
                                        ("trust_remote_code: maybe", "trust_remote_code")])
def test_a_bad_model_option_in_a_ci_file_names_the_file_and_key(tmp_path, extra, key):
    from conserve_bench.ci.suite import CIConfigError, load_config

    path = write_config(tmp_path, extra)
    with pytest.raises(CIConfigError) as refused:
        load_config(path, needs_baselines=False)
    assert str(refused.value).startswith(f"{path}: {key}: ") and "--" not in str(refused.value)


# -- the lm-eval session ------------------------------------------------------------------------


def test_an_lm_eval_session_records_its_options(tmp_path):
    from conserve_bench.config import RunConfig
    from conserve_bench.engine.fake import FakeEngine
    from conserve_bench.harness.session import open_session

    session = open_session("smollm2-135m", f"sqlite:///{tmp_path / 's.db'}", None, RunConfig(),
                           engine=FakeEngine(), options=OPTIONS)
    try:
        assert session.store.get_job(session.job_id).spec.model_options == OPTIONS
    finally:
        session.close()


# -- add_bos_token: the encoder's tokens are lm-eval vllm's --------------------------------------


@pytest.fixture(scope="module")
def tokenizers():
    """The engine's tokenizer (vLLM's, as `Engine` gets it), and lm-eval vllm's with
    add_bos_token=True (`VLLM.__init__`: `get_tokenizer(..., add_bos_token=True)`)."""
    from vllm.tokenizers import get_tokenizer

    from conserve_bench.engine.models import resolve_model

    path = resolve_model("smollm2-135m").path
    return get_tokenizer(path), get_tokenizer(path, add_bos_token=True)


def lm_eval_encode(tokenizer, text: str) -> list[int]:
    """lm-eval vllm's `tok_encode` with add_bos_token=True: special tokens on, unless the text
    begins with the BOS token already."""
    has_bos = text.startswith(tokenizer.decode(tokenizer.bos_token_id))
    return tokenizer(text, add_special_tokens=not has_bos).input_ids


TEXTS = ["The capital of France is", "<|im_start|>user\nHi<|im_end|>\n", " 2 + 2 ="]


@pytest.mark.parametrize("text", TEXTS)
def test_add_bos_token_encodes_as_lm_eval_vllm_does(tokenizers, text):
    from conserve_bench.engine.prompts import Encoder

    engine_tokenizer, lm_eval_tokenizer = tokenizers
    encoder = Encoder(engine_tokenizer, 2048, add_bos_token=True)
    assert encoder.encode(text) == lm_eval_encode(lm_eval_tokenizer, text)
    assert encoder.encode(text).count(engine_tokenizer.bos_token_id) == 1  # never twice


def test_add_bos_token_prefixes_contexts_but_not_continuations(tokenizers):
    """lm-eval's `_encode_pair`: the BOS token opens the context; the continuation is the
    rest of the whole encoding, as without it."""
    from conserve_bench.engine.prompts import Encoder

    engine_tokenizer, _ = tokenizers
    plain = Encoder(engine_tokenizer, 2048)
    with_bos = Encoder(engine_tokenizer, 2048, add_bos_token=True)
    ctx, cont = with_bos.encode_pair("Question: 2 + 2 =", " 4")
    plain_ctx, plain_cont = plain.encode_pair("Question: 2 + 2 =", " 4")
    assert ctx == [engine_tokenizer.bos_token_id, *plain_ctx] and cont == plain_cont
    assert plain.encode("Hello") == engine_tokenizer.encode("Hello", add_special_tokens=False)
