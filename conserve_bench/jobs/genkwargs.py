"""A job's generation arguments (`gen_kwargs`, lm-eval's names): known keys, types, ranges.

One rule for every way in: `lifecycle.submit_job` (`submit`, `ci`) and the job API, which also
bounds the tokens by the served context length. As lm-eval's `vllm` backend, a key of vLLM
0.32.0's `SamplingParams` is handed to it (`engine.generation.SAMPLING_KEYS`), checked here
with vLLM's own ranges (`SamplingParams._verify_args`); lm-eval's own keys (`until`,
`max_gen_toks` and its aliases, `do_sample`) are the engine's to map. A key that would break
the engine's contract is refused with why (`REFUSED`), any other as unknown. Pure: a static
table, no torch, vLLM or lm-eval.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

from conserve_bench.errors import GenKwargsError

MAX_GEN_TOKS = 1 << 20  # tokens to generate, where the context length is not known
MAX_STOP_SEQUENCES = 32  # `until` strings, `bad_words`
MAX_STOP_CHARS = 256  # per `until` string or bad word
MAX_TEMPERATURE = 2.0  # vLLM's own bound
MAX_SEED = 2**63 - 1  # a 64-bit generator seed
MAX_TOKEN_IDS = 4096  # `stop_token_ids`, `allowed_token_ids`, `logit_bias` entries
MAX_TOKEN_ID = 2**31 - 1
MAX_LOGIT_BIAS = 100.0  # vLLM clamps a bias to [-100, 100]; past it is refused here

Check = Callable[[Any, "int | None"], "str | None"]  # (value, max_model_len) -> what it must be


def check_gen_kwargs(gen_kwargs: Any, max_model_len: int | None = None, *,
                     unknown_ok: bool = False) -> None:
    """Raise GenKwargsError (naming the key) unless every argument is known and in range.

    `max_model_len`: the engine's context length; `max_gen_toks` must leave a prompt token.
    `unknown_ok`: skip unknown keys (requests lm-eval built from a task's own YAML, whose
    `generation_kwargs` may hold another backend's, e.g. `num_beams`; the engine passes only
    its known keys on). A refused key is refused even then. None means unset.
    """
    if not isinstance(gen_kwargs, dict):
        raise GenKwargsError("gen_kwargs must be an object of generation arguments")
    for key, value in gen_kwargs.items():
        if key in REFUSED:
            raise GenKwargsError(f"gen_kwargs.{key} is not supported: {REFUSED[key]}")
        check = CHECKS.get(key)
        if check is None:
            if unknown_ok:
                continue
            raise GenKwargsError(_unknown(key))
        if value is not None and (expected := check(value, max_model_len)):
            raise GenKwargsError(f"gen_kwargs.{key} must be {expected}, got {_show(value)}")
    _check_min_tokens(gen_kwargs)


def _check_min_tokens(gen_kwargs: dict[str, Any]) -> None:
    """vLLM refuses `min_tokens` past `max_tokens`; said here, before a job is recorded."""
    most = next((gen_kwargs[k] for k in MAX_TOKENS_KEYS if gen_kwargs.get(k) is not None), None)
    least = gen_kwargs.get("min_tokens")
    if most is not None and least is not None and least > most:
        raise GenKwargsError(f"gen_kwargs.min_tokens must be at most the tokens to generate "
                             f"({most}), got {least}")


def _unknown(key: Any) -> str:
    close = difflib.get_close_matches(str(key), [*CHECKS, *REFUSED], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown generation argument {_show(key)}{hint}; known: {', '.join(CHECKS)}"


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _max_tokens(value: Any, max_model_len: int | None) -> str | None:
    # NOTE: the engine keeps the last `max_model_len - max_gen_toks` context tokens (at least
    # one), so a generation never runs past the context length.
    most = MAX_GEN_TOKS if max_model_len is None else max_model_len - 1
    if _is_int(value) and 1 <= value <= most:
        return None
    context = "" if max_model_len is None else f" (the context length {max_model_len} less one)"
    return f"an integer in [1, {most}]{context}"


def _strings(value: Any, _max_model_len: int | None) -> str | None:
    strings = [value] if isinstance(value, str) else value
    if (isinstance(strings, list) and len(strings) <= MAX_STOP_SEQUENCES
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in strings)):
        return None
    return (f"a string or a list of at most {MAX_STOP_SEQUENCES} strings of 1 to "
            f"{MAX_STOP_CHARS} characters")


def _string_list(value: Any, max_model_len: int | None) -> str | None:
    return _strings(value, max_model_len) if isinstance(value, list) else "a list of strings"


def _flag(value: Any, _max_model_len: int | None) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _only_true(why: str) -> Check:
    def check(value: Any, _max_model_len: int | None) -> str | None:
        return None if value is True else f"true ({why})"

    return check


def _number_in(low: float, high: float, low_open: bool = False) -> Check:
    def check(value: Any, _max_model_len: int | None) -> str | None:
        if _is_number(value) and (value > low if low_open else value >= low) and value <= high:
            return None
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    return check


def _positive(value: Any, _max_model_len: int | None) -> str | None:
    return None if _is_number(value) and value > 0 else "a number greater than 0 (1: off)"


def _integer_in(low: int, high: int, what: str = "") -> Check:
    def check(value: Any, _max_model_len: int | None) -> str | None:
        return None if _is_int(value) and low <= value <= high else f"an integer in [{low}, {high}]{what}"

    return check


def _token_id(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_TOKEN_ID


def _token_ids(value: Any, _max_model_len: int | None) -> str | None:
    if isinstance(value, list) and len(value) <= MAX_TOKEN_IDS and all(map(_token_id, value)):
        return None
    return f"a list of at most {MAX_TOKEN_IDS} token ids (integers >= 0)"


def _logit_bias(value: Any, _max_model_len: int | None) -> str | None:
    # NOTE: JSON (a stored spec, the job API) makes the token ids strings of digits
    def is_id(key: Any) -> bool:
        return _token_id(key) or (isinstance(key, str) and key.isdigit() and int(key) <= MAX_TOKEN_ID)

    if (isinstance(value, dict) and len(value) <= MAX_TOKEN_IDS and all(map(is_id, value))
            and all(_is_number(b) and abs(b) <= MAX_LOGIT_BIAS for b in value.values())):
        return None
    return (f"an object of at most {MAX_TOKEN_IDS} token ids -> a bias in "
            f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")


MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")

ENGINE_DECODES = "the engine decodes generated text itself, special tokens skipped"

# NOTE: every key here but lm-eval's own (`until`, `MAX_TOKENS_KEYS`, `do_sample`,
# `temperature`) reaches SamplingParams by name (`engine.generation.SAMPLING_KEYS`, the same
# set; tests/test_genkwargs_passthrough.py holds the two and vLLM's fields together).
CHECKS: dict[str, Check] = {
    "until": _strings,
    "max_gen_toks": _max_tokens,
    "max_new_tokens": _max_tokens,  # lm-eval's other names for it, in its order of priority
    "max_tokens": _max_tokens,
    "max_completion_tokens": _max_tokens,
    "do_sample": _flag,
    "temperature": _number_in(0.0, MAX_TEMPERATURE),
    "top_p": _number_in(0.0, 1.0, low_open=True),
    "top_k": _integer_in(-1, 2**31 - 1, " (0 or -1: off)"),
    "min_p": _number_in(0.0, 1.0),
    "seed": _integer_in(0, MAX_SEED),
    "presence_penalty": _number_in(-2.0, 2.0),
    "frequency_penalty": _number_in(-2.0, 2.0),
    "repetition_penalty": _positive,
    "min_tokens": _integer_in(0, MAX_GEN_TOKS),
    "stop_token_ids": _token_ids,
    "ignore_eos": _flag,
    "logit_bias": _logit_bias,
    "allowed_token_ids": _token_ids,
    "bad_words": _string_list,
    "include_stop_str_in_output": _flag,  # NOTE: no effect, as in lm-eval: `until` cuts the text
    "skip_special_tokens": _only_true(ENGINE_DECODES),
    "spaces_between_special_tokens": _only_true(ENGINE_DECODES),
}

ONE_RESULT = "a work item's result is one generated text"

# SamplingParams' fields (and `best_of`, gone from it) that would break the engine's contract
REFUSED: dict[str, str] = {
    "n": ONE_RESULT,
    "best_of": ONE_RESULT,
    "logprobs": ONE_RESULT + ", without logprobs",
    "flat_logprobs": ONE_RESULT + ", without logprobs",
    "prompt_logprobs": "the engine asks for the logprobs a scored request needs itself",
    "prompt_logprob_token_ids": "the engine asks for the logprobs a scored request needs itself",
    "prompt_logprob_start": "the engine asks for the logprobs a scored request needs itself",
    "logprob_token_ids": "the engine asks for the logprobs a scored request needs itself",
    "stop": "lm-eval's name for stop strings is `until`",
    "output_kind": "the engine streams a generation's tokens itself, to save its partials",
    "stream_interval": "the engine streams a generation's tokens itself, to save its partials",
    "detokenize": "stop strings need vLLM's detokenizer",
    "output_text_buffer_length": ENGINE_DECODES,
    "structured_outputs": "a generation continued from its saved tokens cannot resume a grammar",
    "repetition_detection": "a generation continued from its saved tokens cannot resume it",
    "thinking_token_budget": "a generation continued from its saved tokens cannot resume it",
    "watermarking": "it changes sampling in a way a continued generation cannot reproduce",
    "trace_decode_token_ids": "it replaces the model's output; results would not be the model's",
    "extra_args": "only keys the engine knows reach vLLM",
    "skip_clone": "the engine's own setting",
    "skip_reading_prefix_cache": "the engine's own setting",
    "routed_experts_prompt_start": "the engine returns no expert routing",
}
