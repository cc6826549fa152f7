"""Request translation, without vLLM: lm-eval's tokenization rules, prompt sharing, folding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conserve_bench.engine.generation import Generation
from conserve_bench.engine.prompts import (Assembler, Encoder, GeneratedText, NextTokenScore,
                                           PromptScore, build_prompts)
from conserve_bench.store import WorkItem, item_key


@pytest.fixture(scope="module")
def tokenizer(model_ref):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_ref.path)


@pytest.fixture(scope="module")
def template_lm(tokenizer):
    """lm-eval's own TemplateLM rules over the same tokenizer: the oracle for encode_pair."""
    from lm_eval.api.model import TemplateLM

    class Oracle(TemplateLM):
        backend = "causal"
        eot_token_id = tokenizer.eos_token_id
        prefix_token_id = tokenizer.bos_token_id

        def tok_encode(self, string, add_special_tokens=False, **kw):
            return tokenizer.encode(string, add_special_tokens=False)

        def _loglikelihood_tokens(self, requests, **kw):
            return [(ctx, cont) for _, ctx, cont in requests]

        loglikelihood_rolling = generate_until = None

    return Oracle()


def item(kind, *args, key=None):
    return WorkItem(key or item_key(kind, list(args), "m"), kind, list(args))


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(context=text, continuation=text.filter(bool))
def test_encode_pair_matches_lm_eval(tokenizer, template_lm, context, continuation):
    from lm_eval.api.instance import Instance

    encoder = Encoder(tokenizer, 2048)
    # NOTE: lm-eval itself raises IndexError on an empty context with a continuation of no
    # tokens (a lone control character); our split for it is pinned below.
    assume(context or tokenizer.encode(continuation, add_special_tokens=False))
    [(ctx, cont)] = template_lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)],
                                              disable_tqdm=True)
    assert encoder.encode_pair(context, continuation) == (ctx, cont)


def test_a_continuation_of_no_tokens_after_no_context_scores_no_tokens(tokenizer):
    encoder = Encoder(tokenizer, 2048)
    assert tokenizer.encode("\x16", add_special_tokens=False) == []
    assert encoder.encode_pair("", "\x16") == ([encoder.prefix_token_id], [])


def test_choices_sharing_a_context_encode_it_once(tokenizer):
    """An MMLU question's 4 choices: the context once and each whole string once (5
    encodings, not 8), with the split lm-eval makes (`test_encode_pair_matches_lm_eval`)."""
    encoded = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text, **kwargs):
            encoded.append(text)
            return tokenizer.encode(text, **kwargs)

    context = "Question: 1+1?\nAnswer:"
    work = [item("loglikelihood", context, f" {c}") for c in "ABCD"]
    prompts, _ = build_prompts(work, Encoder(Counting(), 2048))
    assert encoded == [context] + [context + f" {c}" for c in "ABCD"]
    assert prompts == build_prompts(work, Encoder(tokenizer, 2048))[0]


def test_single_token_choices_share_one_prompt(tokenizer):
    encoder = Encoder(tokenizer, 2048)
    work = [item("loglikelihood", "Question: 1+1?\nAnswer:", f" {c}") for c in "ABCD"]
    prompts, num_parts = build_prompts(work, encoder)
    assert len(prompts) == 1
    [prompt] = prompts
    assert prompt.params["max_tokens"] == 1 and "prompt_logprobs" not in prompt.params
    assert [p.key for p in prompt.parts] == [w.key for w in work]
    assert len(set(prompt.params["logprob_token_ids"])) == 4
    assert num_parts == {w.key: 1 for w in work}


def test_multi_token_continuation_uses_prompt_logprobs(tokenizer):
    encoder = Encoder(tokenizer, 2048)
    [prompt], _ = build_prompts([item("loglikelihood", "The capital of France is", " Paris, France")], encoder)
    ctx, cont = encoder.encode_pair("The capital of France is", " Paris, France")
    assert prompt.token_ids == ctx + cont and prompt.params["prompt_logprobs"] == 1
    assert prompt.parts[0].start == len(ctx)


@settings(max_examples=30, deadline=None)
@given(num_words=st.integers(1, 300), max_model_len=st.integers(8, 64))
def test_rolling_windows_score_every_token_once(tokenizer, num_words, max_model_len):
    encoder = Encoder(tokenizer, max_model_len)
    text_ = " ".join(f"word{i}" for i in range(num_words))
    prompts, num_parts = build_prompts([item("loglikelihood_rolling", text_, key="r")], encoder)
    scored = []
    for p in prompts:
        assert len(p.token_ids) < max_model_len  # vLLM keeps a position for its one token
        scored += p.token_ids[p.parts[0].start:]
    assert scored == encoder.encode(text_)
    assert num_parts["r"] == len(prompts)


def test_generation_params_follow_lm_eval(tokenizer):
    encoder = Encoder(tokenizer, 2048)
    gen = {"until": ["\n\n", "Q:"], "max_gen_toks": 32, "do_sample": False, "temperature": 0.7}
    [prompt], _ = build_prompts([item("generate_until", "Q: hi\nA:", gen)], encoder)
    assert prompt.params["max_tokens"] == 32
    assert prompt.params["temperature"] == 0.0  # do_sample=False wins, as in lm-eval
    assert prompt.params["stop"] == ["\n\n", "Q:", tokenizer.eos_token]


def logprob(value, rank=1):
    return SimpleNamespace(logprob=value, rank=rank)


def test_assembler_folds_parts_into_lm_eval_results():
    asm = Assembler()
    work = [item("loglikelihood", "c", " A", key="a"), item("loglikelihood", "c", " B", key="b"),
            item("loglikelihood_rolling", "t", key="r"), item("generate_until", "p", {}, key="g")]
    asm.expect(work, {"a": 1, "b": 1, "r": 2, "g": 1})
    shared = SimpleNamespace(parts=[NextTokenScore("a", 5), NextTokenScore("b", 6)])
    out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[6], logprobs=[{5: logprob(-2.0), 6: logprob(-0.5)}])])
    assert asm.add(shared, out) == [("a", [-2.0, False]), ("b", [-0.5, True])]
    window = SimpleNamespace(parts=[PromptScore("r", 1)])
    first = SimpleNamespace(prompt_token_ids=[1, 7, 8], prompt_logprobs=[None, {7: logprob(-1.0)}, {8: logprob(-2.0, 3)}])
    assert asm.add(window, first) == []
    second = SimpleNamespace(prompt_token_ids=[8, 9], prompt_logprobs=[None, {9: logprob(-0.25)}])
    assert asm.add(window, second) == [("r", -3.25)]
    gen = SimpleNamespace(parts=[GeneratedText("g", ("\n",))])
    generation = Generation.start("g", ("\n",), 32, lambda ids: "".join(map(chr, ids)))
    generation.extend([ord(c) for c in "Paris\nQ:"])
    assert asm.add(gen, generation) == [("g", "Paris")]  # read from its tokens
    assert asm.num_pending == 0


def test_item_key_depends_on_request_and_model():
    # NOTE: keys are stored: one computed otherwise (another process, a later version) would
    # orphan every result computed before
    assert item_key("loglikelihood", ["a", "b"], "m1") == (
        "8e7dd60948112405f6fd48b4c8274152e991e52afcec52ff62784df0e3cd480c")
    assert item_key("loglikelihood", ["a", "b"], "m1") != item_key("loglikelihood", ["a", "b"], "m2")
    assert item_key("loglikelihood", ["a", "b"], "m1") != item_key("loglikelihood", ["a", "c"], "m1")


def _words(num_tokens: int, tokenizer) -> str:
    text_ = " ".join(f"w{i}" for i in range(num_tokens))
    while len(tokenizer.encode(text_, add_special_tokens=False)) > num_tokens:
        text_ = text_.rsplit(" ", 1)[0]
    return text_


@pytest.mark.parametrize("extra", [-1, 0, 1, 40])
def test_contexts_are_scored_whole_up_to_the_context_length(tokenizer, extra):
    """A context that fits the engine's prompt is never truncated (one prefill); a longer one
    is cut from the left like lm-eval's hf, keeping the continuation whole."""
    encoder = Encoder(tokenizer, 256)
    context = _words(encoder.max_prompt_len + extra, tokenizer)
    ctx, cont = encoder.encode_pair(context, " B")
    [prompt], _ = build_prompts([item("loglikelihood", context, " B")], encoder)
    if len(ctx) <= encoder.max_prompt_len:
        assert prompt.token_ids == ctx and prompt.params["logprob_token_ids"] == cont
    else:
        assert prompt.token_ids == (ctx + cont)[-encoder.max_prompt_len:]
        assert prompt.token_ids[prompt.parts[0].start:] == cont


def test_generation_context_leaves_room_for_max_gen_toks_like_lm_eval(tokenizer):
    encoder = Encoder(tokenizer, 256)
    context = _words(400, tokenizer)
    gen = {"until": ["\n"], "max_gen_toks": 56}
    [prompt], _ = build_prompts([item("generate_until", context, gen)], encoder)
    # NOTE: hf keeps the last `max_length - max_gen_toks` tokens of the context
    assert prompt.token_ids == encoder.encode(context)[-(256 - 56):]
