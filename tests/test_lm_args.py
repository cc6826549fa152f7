"""`--model conserve` takes lm-eval `vllm` backend's model_args (harness/modelargs.py).

Aliases (`pretrained`, `max_length`) resolve, engine options reach the session as
`ModelOptions`, speed-only options are accepted and noted, options that would change what is
measured are refused in one line, and `max_gen_toks` becomes each generation's default length
before its item is keyed. In client mode, engine options must be what the server runs. All on
the fake engine: the argument handling is what is tested.
"""

from __future__ import annotations

import logging

import pytest
from lm_eval.api.instance import Instance

from conserve_bench.engine.fake import FAKE_FINGERPRINT, FakeEngine
from conserve_bench.errors import ModelArgsError
from conserve_bench.harness.lm import ConserveLM
from conserve_bench.harness.modelargs import check_served
from conserve_bench.store import Store, item_key

LM_EVAL_GENERIC = {"batch_size": "auto", "max_batch_size": None, "device": "cpu"}


def make_lm(tmp_path, arg_string: str) -> ConserveLM:
    """`--model conserve --model_args ARG_STRING` on the fake engine, as lm-eval builds it."""
    extra = {**LM_EVAL_GENERIC, "engine": FakeEngine(), "progress": False}
    return ConserveLM.create_from_arg_string(f"db=sqlite:///{tmp_path / 'lm.db'},{arg_string}", extra)


def refusal(tmp_path, arg_string: str) -> str:
    with pytest.raises(ModelArgsError) as e:
        make_lm(tmp_path, arg_string)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_vllm_model_args_reach_the_session_as_model_options(tmp_path):
    """What a `--model vllm` user types: `pretrained`, `max_length` for `max_model_len`,
    `dtype` spelled vLLM's way; the session's job records them."""
    with make_lm(tmp_path, "pretrained=smollm2-135m,dtype=half,max_length=512,seed=1234,"
                           "trust_remote_code=true,add_bos_token=true") as lm:
        job = Store(f"sqlite:///{tmp_path / 'lm.db'}").get_job(lm.job_id)
    options = job.spec.model_options
    assert (lm.model, job.spec.model) == ("smollm2-135m", "smollm2-135m")
    assert (options.dtype, options.max_model_len, options.seed) == ("float16", 512, 1234)
    assert options.trust_remote_code is True and options.add_bos_token is True


def test_model_and_its_aliases_must_agree(tmp_path):
    assert "name different models" in refusal(tmp_path, "model=smollm2-135m,pretrained=org/other")
    assert "disagree" in refusal(tmp_path, "max_length=512,max_model_len=1024")
    with make_lm(tmp_path, "model=smollm2-135m,pretrained=smollm2-135m,max_length=64,max_model_len=64") as lm:
        assert lm.model == "smollm2-135m"


def test_an_invalid_engine_option_is_a_one_line_model_args_error(tmp_path):
    assert "dtype" in refusal(tmp_path, "dtype=float8")
    assert "max_gen_toks" in refusal(tmp_path, "max_gen_toks=0")


def test_speed_only_vllm_args_are_accepted_and_noted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="conserve_bench.harness.modelargs"):
        lm = make_lm(tmp_path, "swap_space=4,data_parallel_size=2,enable_prefix_caching=true,"
                               "tokenizer_mode=auto,gpu_memory_utilization=0.8,tokenizer=smollm2-135m")
        lm.close()
    noted = caplog.text
    assert all(f"model_args {name} ignored" in noted
               for name in ("swap_space", "data_parallel_size", "enable_prefix_caching"))


@pytest.mark.parametrize("arg_string, named", [
    ("quantization=awq", "quantization"),
    ("lora_local_path=/tmp/adapter", "lora_local_path"),
    ("tokenizer=HuggingFaceTB/SmolLM2-360M-Instruct", "tokenizer"),
    ("tokenizer_mode=slow", "tokenizer_mode"),
    ("truncation_side=right", "truncation_side"),
    ("prefix_token_id=1", "prefix_token_id"),
    ("tokenizer_revision=abc123", "tokenizer_revision"),
])
def test_args_that_would_change_what_is_measured_are_refused(tmp_path, arg_string, named):
    message = refusal(tmp_path, arg_string)
    assert f"model_args {named}" in message
    assert Store(f"sqlite:///{tmp_path / 'lm.db'}").list_jobs() == []  # refused before a job


def test_a_typo_names_the_closest_known_arg(tmp_path):
    message = refusal(tmp_path, "dtpye=float16,max_gen_tok=8")
    assert "'dtpye' (did you mean 'dtype'?)" in message
    assert "'max_gen_tok' (did you mean 'max_gen_toks'?)" in message


def generation(context: str, gen_kwargs: dict) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def test_max_gen_toks_is_each_generations_default_length_and_part_of_its_key(tmp_path):
    """As lm-eval's `vllm` applies it: to requests that name no length of their own."""
    engine = FakeEngine()
    lm = ConserveLM(db=f"sqlite:///{tmp_path / 'lm.db'}", engine=engine, max_gen_toks=32,
                    progress=False)
    own = [{"until": ["\n"], "max_gen_toks": 5}, {"max_new_tokens": 7}, {"max_tokens": 9}]
    with lm:
        lm.generate_until([generation("Q:", {"until": ["\n"]}), *(generation("Q:", g) for g in own)])
        args = [item["args"] for item in lm.backend.store.job_items(lm.job_id, with_args=True)]
    assert args == [["Q:", {"until": ["\n"], "max_gen_toks": 32}], *(["Q:", g] for g in own)]
    expected = item_key("generate_until", ["Q:", {"until": ["\n"], "max_gen_toks": 32}], FAKE_FINGERPRINT)
    assert engine.submitted[0] == expected


SERVED = {"model": "smollm2-135m", "dtype": "float32", "max_model_len": 8192, "add_bos_token": False}


def test_client_mode_takes_engine_options_only_as_the_server_runs_them(caplog):
    check_served({"dtype": "float", "max_model_len": 8192, "add_bos_token": False, "seed": None},
                 "smollm2-135m", SERVED)
    check_served({"dtype": "auto"}, None, SERVED)  # the model's own dtype: the server's
    with caplog.at_level(logging.WARNING, logger="conserve_bench.harness.modelargs"):
        check_served({"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5}, None, SERVED)
    assert "model_args tensor_parallel_size ignored" in caplog.text
    refused = {("max_model_len", 2048): "the server runs max_model_len=8192",
               ("dtype", "bfloat16"): "the server runs dtype='float32'",
               ("seed", 1234): "drop seed=", ("revision", "main"): "drop revision="}
    for (name, value), message in refused.items():
        with pytest.raises(ModelArgsError, match=message):
            check_served({name: value}, None, SERVED)
    with pytest.raises(ModelArgsError, match="the server serves smollm2-135m, not org/other"):
        check_served({}, "org/other", SERVED)
