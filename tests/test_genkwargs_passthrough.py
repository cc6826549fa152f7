"""Generation arguments reach vLLM as lm-eval's `vllm` backend hands them: checked, passed,
or refused with a reason; those that depend on the tokens generated so far still hold when a
generation continues from a partial (or it starts over). The real engine at the end."""

from __future__ import annotations

import pytest

from conserve_bench.engine.generation import (SAMPLING_KEYS, Generation, continued,
                                              is_resumable, sampling_kwargs)
from conserve_bench.errors import GenKwargsError
from conserve_bench.jobs.genkwargs import CHECKS, REFUSED, check_gen_kwargs
from conserve_bench.store import WorkItem
from .test_partials_engine import generate  # the same loop: submit, then step to the end

LM_EVAL_KEYS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens",
                "do_sample", "temperature"}

PASSED = {"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.3,
          "min_tokens": 4, "stop_token_ids": [13, 198], "ignore_eos": False,
          "logit_bias": {"42": -5.0}, "allowed_token_ids": [1, 2, 3], "bad_words": ["foo"],
          "include_stop_str_in_output": False, "skip_special_tokens": True,
          "spaces_between_special_tokens": True, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
          "seed": 7}


def vllm_fields() -> dict:
    from vllm import SamplingParams

    defaults = SamplingParams()
    return {name: getattr(defaults, name) for name in SamplingParams.__struct_fields__
            if not name.startswith("_")}


def test_the_table_and_the_engine_agree_on_the_passed_keys():
    assert set(CHECKS) - LM_EVAL_KEYS == SAMPLING_KEYS
    assert not set(CHECKS) & set(REFUSED)
    assert set(PASSED) == SAMPLING_KEYS


def test_every_passed_key_is_a_sampling_params_field_and_every_field_is_decided():
    """The contract with vLLM 0.32.0: a passed name exists, and a field added by an upgrade
    fails here until it is passed (with a check) or refused (with a reason)."""
    from vllm import SamplingParams

    fields = vllm_fields()
    assert SAMPLING_KEYS <= set(fields), SAMPLING_KEYS - set(fields)
    assert set(REFUSED) - {"best_of"} <= set(fields), set(REFUSED) - set(fields)
    assert set(fields) <= set(CHECKS) | set(REFUSED), set(fields) - set(CHECKS) - set(REFUSED)
    # vLLM's defaults pass our checks, and what passes ours is a SamplingParams vLLM accepts
    defaults = {k: v for k, v in fields.items() if k in SAMPLING_KEYS and v is not None}
    check_gen_kwargs(defaults)
    check_gen_kwargs(PASSED)
    params = SamplingParams(**sampling_kwargs(PASSED), max_tokens=8, temperature=0.7)
    assert (params.repetition_penalty, params.min_tokens, params.logit_bias) == (1.3, 4, {42: -5.0})


def test_passed_keys_reach_the_sampling_params_and_others_are_dropped():
    from types import SimpleNamespace

    from conserve_bench.engine.prompts import Encoder, build_prompts

    tokenizer = SimpleNamespace(eos_token_id=0, bos_token_id=None, decode=lambda ids: "</s>",
                                encode=lambda text, add_special_tokens=False: [5] * len(text))
    gen = {"until": ["\n"], "max_new_tokens": 16, "num_beams": 4, "top_k": None, **PASSED}
    [prompt], _ = build_prompts([WorkItem("g", "generate_until", ["Q:", gen])], Encoder(tokenizer, 64))
    expected = {**PASSED, "logit_bias": {42: -5.0}}
    assert prompt.params == {**expected, "max_tokens": 16, "temperature": 0.0, "stop": ["\n", "</s>"]}
    # lm-eval's order among the names of the tokens to generate
    [prompt], _ = build_prompts([WorkItem("h", "generate_until", ["Q:", {
        "max_completion_tokens": 3, "max_tokens": 5}])], Encoder(tokenizer, 64))
    assert prompt.params["max_tokens"] == 5


@pytest.mark.parametrize("gen_kwargs, named", [
    ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\]"),
    ({"frequency_penalty": "x"}, "frequency_penalty must be"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number greater than 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens must be an integer"),
    ({"min_tokens": 9, "max_gen_toks": 8}, r"min_tokens must be at most the tokens to generate \(8\)"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list"),
    ({"stop_token_ids": 13}, "stop_token_ids must be a list"),
    ({"allowed_token_ids": [True]}, "allowed_token_ids"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias must be an object"),
    ({"logit_bias": {"5": 101}}, r"logit_bias must be .*\[-100, 100\]"),
    ({"bad_words": "foo"}, "bad_words must be a list"),
    ({"ignore_eos": 1}, "ignore_eos must be true or false"),
    ({"skip_special_tokens": False}, "skip_special_tokens must be true .the engine decodes"),
])
def test_passed_keys_are_checked_as_vllm_checks_them(gen_kwargs, named):
    with pytest.raises(GenKwargsError, match=named):
        check_gen_kwargs(gen_kwargs)


@pytest.mark.parametrize("key, value, reason", [
    ("n", 2, "one generated text"), ("best_of", 2, "one generated text"),
    ("logprobs", 5, "without logprobs"), ("prompt_logprobs", 1, "scored request"),
    ("output_kind", 1, "streams"), ("detokenize", False, "detokenizer"),
    ("structured_outputs", {"json": {}}, "grammar"), ("stop", ["\n"], "`until`"),
])
def test_keys_that_break_the_engine_contract_are_refused_with_a_reason(key, value, reason):
    for unknown_ok in (False, True):  # a task's own YAML may not bring them in either
        with pytest.raises(GenKwargsError, match=f"gen_kwargs.{key} is not supported: .*{reason}"):
            check_gen_kwargs({key: value}, unknown_ok=unknown_ok)


def test_keys_vllm_has_not_are_unknown():
    with pytest.raises(GenKwargsError, match="unknown generation argument 'num_beams'"):
        check_gen_kwargs({"num_beams": 4})
    with pytest.raises(GenKwargsError, match="did you mean 'repetition_penalty'"):
        check_gen_kwargs({"repetition_penalt": 1.2})


def test_a_continued_generation_keeps_its_token_floor_and_output_penalties_start_over():
    params = {"max_tokens": 40, "min_tokens": 10, "temperature": 0.0, "repetition_penalty": 1.3}
    prompt, rest = continued([1, 2], params, [7, 8, 9])
    assert prompt == [1, 2, 7, 8, 9] and (rest["max_tokens"], rest["min_tokens"]) == (37, 7)
    assert continued([1], params, list(range(12)))[1]["min_tokens"] == 0
    assert "min_tokens" not in continued([1], {"max_tokens": 4}, [5])[1]
    assert is_resumable(params)  # vLLM's repetition penalty covers prompt and output alike
    assert is_resumable({**params, "presence_penalty": 0.0, "bad_words": []})
    for key, value in (("presence_penalty", 0.5), ("frequency_penalty", -0.1), ("bad_words", ["x"])):
        assert not is_resumable({**params, key: value}), key


def test_a_stop_token_ends_the_text_as_vllm_ends_it():
    decode = lambda ids: "".join(chr(96 + i) for i in ids)  # noqa: E731  1 -> "a"
    generation = Generation.start("g", ("zz",), 10, decode, [1, 2], stop_token_ids=[3])
    assert not generation.is_complete()
    generation.extend([4, 3, 5])
    assert generation.text() == "abd"
    assert Generation.start("g", (), 10, decode, [1, 3], stop_token_ids=[3]).is_complete()


# -- the real engine ---------------------------------------------------------------------------

MAX_TOKENS = 48


def items(openings, prefix, **gen_kwargs) -> list[WorkItem]:
    gen = {"until": ["\n\n\n\n"], "max_gen_toks": MAX_TOKENS, **gen_kwargs}
    return [WorkItem(f"{prefix}{i}", "generate_until", [text, gen]) for i, text in enumerate(openings)]


@pytest.mark.engine
def test_penalties_reach_vllm_and_a_continued_generation_keeps_them(engine):
    from .tasks.tiny import STORIES

    plain, _ = generate(engine, items(STORIES, "p"))
    work = items(STORIES, "r", repetition_penalty=1.3, min_tokens=MAX_TOKENS // 2)
    whole, tokens = generate(engine, work)
    assert [whole[f"r{i}"] for i in range(len(STORIES))] != [plain[f"p{i}"] for i in range(len(STORIES))]
    # continued from partials shorter and longer than min_tokens: the text of one straight run
    cuts = {w.key: cut for w, cut in zip(work, (2, 10, 30, MAX_TOKENS - 3))}
    assert all(len(tokens[w.key]) > cuts[w.key] for w in work)
    resumed, _ = generate(engine, work, {key: tokens[key][:cut] for key, cut in cuts.items()})
    assert resumed == whole

    # a penalty over vLLM's own output: no partial is kept, and a stale one is ignored
    counted = items(STORIES[:2], "c", presence_penalty=1.0)
    straight, seen = generate(engine, counted)
    assert seen == {}
    again, _ = generate(engine, counted, {w.key: [13, 13, 13] for w in counted})
    assert again == straight
