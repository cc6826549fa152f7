"""A job's generation arguments (`gen_kwargs`, lm-eval's names): known keys, types, ranges.

One rule for every way in: `lifecycle.submit_job` (`submit`, `ci`) and the job API, which also
bounds the tokens by the served context length. The keys are those the engine honours
(`engine.prompts._generation`; any other would be dropped silently, so it is refused), the
ranges vLLM 0.32.0's `SamplingParams._verify_args`. Pure: no torch, vLLM or lm-eval.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

from conserve_bench.errors import GenKwargsError

MAX_GEN_TOKS = 1 << 20  # tokens to generate, where the context length is not known
MAX_STOP_SEQUENCES = 32  # `until` strings
MAX_STOP_CHARS = 256  # per `until` string
MAX_TEMPERATURE = 2.0  # vLLM's own bound
MAX_SEED = 2**63 - 1  # a 64-bit generator seed

Check = Callable[[Any, "int | None"], "str | None"]  # (value, max_model_len) -> what it must be


def check_gen_kwargs(gen_kwargs: Any, max_model_len: int | None = None, *,
                     unknown_ok: bool = False) -> None:
    """Raise GenKwargsError (naming the key) unless every argument is known and in range.

    `max_model_len`: the engine's context length; `max_gen_toks` must leave a prompt token.
    `unknown_ok`: skip unknown keys (requests lm-eval built from a task's own YAML, whose
    `generation_kwargs` may hold another backend's, e.g. `num_beams`). None means unset.
    """
    if not isinstance(gen_kwargs, dict):
        raise GenKwargsError("gen_kwargs must be an object of generation arguments")
    for key, value in gen_kwargs.items():
        check = CHECKS.get(key)
        if check is None:
            if unknown_ok:
                continue
            raise GenKwargsError(_unknown(key))
        if value is not None and (expected := check(value, max_model_len)):
            raise GenKwargsError(f"gen_kwargs.{key} must be {expected}, got {_show(value)}")


def _unknown(key: Any) -> str:
    close = difflib.get_close_matches(str(key), CHECKS, n=1)
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


def _stop(value: Any, _max_model_len: int | None) -> str | None:
    stops = [value] if isinstance(value, str) else value
    if (isinstance(stops, list) and len(stops) <= MAX_STOP_SEQUENCES
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        return None
    return (f"a string or a list of at most {MAX_STOP_SEQUENCES} strings of 1 to "
            f"{MAX_STOP_CHARS} characters")


def _flag(value: Any, _max_model_len: int | None) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _number_in(low: float, high: float, low_open: bool = False) -> Check:
    def check(value: Any, _max_model_len: int | None) -> str | None:
        if _is_number(value) and (value > low if low_open else value >= low) and value <= high:
            return None
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    return check


def _integer_in(low: int, high: int, what: str = "") -> Check:
    def check(value: Any, _max_model_len: int | None) -> str | None:
        return None if _is_int(value) and low <= value <= high else f"an integer in [{low}, {high}]{what}"

    return check


CHECKS: dict[str, Check] = {
    "until": _stop,
    "max_gen_toks": _max_tokens,
    "max_new_tokens": _max_tokens,  # lm-eval's other name for it
    "do_sample": _flag,
    "temperature": _number_in(0.0, MAX_TEMPERATURE),
    "top_p": _number_in(0.0, 1.0, low_open=True),
    "top_k": _integer_in(-1, 2**31 - 1, " (0 or -1: off)"),
    "min_p": _number_in(0.0, 1.0),
    "seed": _integer_in(0, MAX_SEED),
}
