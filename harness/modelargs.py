"""lm-eval's `--model_args` for `--model conserve`: what a user of `--model vllm` types.

`parse_model_args` sorts the arguments `ConserveLM` does not take by name into the engine's
(lm-eval `vllm` names: `dtype`, `max_model_len`, ...), those accepted and ignored (they change
speed or memory, never a result: logged), and those refused because ignoring them would change
what is measured (a LoRA, a quantization, another tokenizer). Unknown names are refused too,
naming the closest known one. It only reads its input: it starts nothing.

lm-eval names relied on: `VLLM.__init__`'s parameters (lm_eval/models/vllm_causallms.py).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from conserve_bench.errors import ModelArgsError

log = logging.getLogger(__name__)

# The engine's options (`config.ModelOptions`), under lm-eval `vllm`'s names (and ours:
# `deterministic`, docs/scoring.md).
ENGINE_ARGS = ("dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size",
               "revision", "trust_remote_code", "add_bos_token", "seed", "deterministic")
ALIASES = {"max_length": "max_model_len"}  # lm-eval's generic name -> the vllm backend's
# lm-eval's own options, which `create_from_arg_string` hands every backend: this one batches
# by itself (`max_inflight`) and runs where its engine runs.
LM_EVAL_OPTIONS = ("batch_size", "max_batch_size", "device")
# `vllm` arguments that change speed or memory only: accepted, noted in the log, ignored.
IGNORED = {
    "swap_space": "vLLM has no swap space any more (lm-eval ignores it too)",
    "data_parallel_size": "one engine computes every request; results do not depend on it",
    "enable_prefix_caching": "the engine decides; results do not depend on it",
    "enforce_eager": "set CONSERVE_BENCH_ENFORCE_EAGER=1 instead; results do not depend on it",
    "max_num_seqs": "`max_inflight` bounds the requests in flight",
    "max_num_batched_tokens": "the engine's own step budget applies",
    "enable_chunked_prefill": "the engine decides; results do not depend on it",
    "distributed_executor_backend": "the engine runs on one node",
    "max_lora_rank": "no LoRA is loaded",
}
# `vllm` arguments taken at the value conserve computes with; any other would change results.
ONLY = {"tokenizer_mode": ("auto",), "truncation_side": ("left",), "enable_thinking": (None, False)}
# `vllm` arguments that would change what is measured, were they ignored.
REFUSED = {
    "quantization": "the engine loads the model's own weights; quantize the model directory",
    "lora_local_path": "no LoRA adapter is loaded; merge it into a model directory",
    "kv_cache_dtype": "the KV cache keeps the model's dtype",
    "prefix_token_id": "an empty context is always preceded by the tokenizer's BOS (or EOS) token",
    "chat_template_args": "the chat template renders with its default arguments",
    "think_end_token": "generations are returned whole",
}


@dataclass(frozen=True)
class ModelArgs:
    """The model_args sorted: `engine` holds the engine options given (lm-eval `vllm` names,
    aliases resolved); `ignored` the names accepted without effect."""

    engine: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


def parse_model_args(args: dict[str, Any], model: str, known: Iterable[str]) -> ModelArgs:
    """Sort `args` (the model_args `ConserveLM` does not take by name) for the model named
    `model`; ModelArgsError, one line, for any refused or unknown (naming `known`'s closest)."""
    _refuse_unknown(args, known)
    engine: dict[str, Any] = {}
    for name, value in args.items():
        target = ALIASES.get(name, name)
        if target in ENGINE_ARGS:
            if target in engine and engine[target] != value:
                raise ModelArgsError(f"model_args {name}={value!r} and {target}={engine[target]!r} "
                                     "disagree; give one")
            engine[target] = value
        else:
            _check_other(name, value, model, args)
    ignored = tuple(n for n in args if n in IGNORED)
    for name in ignored:
        log.warning("conserve: model_args %s ignored: %s", name, IGNORED[name])
    return ModelArgs(engine, ignored)


# Client mode: a running server's engine cannot change; these change no result, so are ignored.
SERVED_IGNORED = ("gpu_memory_utilization", "tensor_parallel_size", "trust_remote_code")
SERVED_CHECKED = ("dtype", "max_model_len", "add_bos_token")  # taken if what the server runs


def check_served(engine: dict[str, Any], model: str | None, served: dict[str, Any]) -> None:
    """Client mode: refuse (one line) a model or engine option other than what the server's
    running engine has (`served`: `GET /v1/jobs/model`); ignore, logged, those that change no
    result; refuse the rest (`revision`, `seed`), which a running engine cannot honour."""
    if model is not None and not _same_model(model, served["model"]):
        raise ModelArgsError(f"the server serves {served['model']}, not {model}")
    for name, value in engine.items():
        if value is None:
            continue  # NOTE: lm-eval's way of leaving an option at its default
        if name in SERVED_IGNORED:
            log.warning("conserve: model_args %s ignored: the server's engine is running", name)
        elif name not in SERVED_CHECKED:
            raise ModelArgsError(f"model_args {name}: the server's engine runs with its own; "
                                 f"drop {name}= (or start the server with it)")
        elif name == "dtype" and str(value).lower() == "auto":
            continue  # NOTE: the model's own dtype, as the server resolved it
        elif value != served[name] and not (name == "dtype" and _same_dtype(value, served[name])):
            raise ModelArgsError(f"model_args {name}={value!r}: the server runs "
                                 f"{name}={served[name]!r}")


def _same_dtype(given: Any, served: Any) -> bool:
    from conserve_bench.config import DTYPES

    return DTYPES.get(str(given).lower(), given) == served


def known_names(own: Iterable[str]) -> list[str]:
    """Every model_args name this backend takes: `own` (ConserveLM's) and lm-eval `vllm`'s."""
    return [*own, *ENGINE_ARGS, *ALIASES, "tokenizer", "tokenizer_revision", *ONLY, *IGNORED]


def _check_other(name: str, value: Any, model: str, args: dict[str, Any]) -> None:
    if name in REFUSED and value is not None:
        raise ModelArgsError(f"model_args {name} is not supported by conserve: {REFUSED[name]}")
    if name in ONLY and value not in ONLY[name]:
        allowed = " or ".join(repr(v) for v in ONLY[name])
        raise ModelArgsError(f"model_args {name}={value!r} is not supported by conserve (only {allowed})")
    if name == "tokenizer" and value is not None and not _same_model(value, model):
        raise ModelArgsError(f"model_args tokenizer={value!r}: conserve tokenizes with the "
                             f"model's own tokenizer ({model}); drop tokenizer=")
    if name == "tokenizer_revision" and value not in (None, args.get("revision")):
        raise ModelArgsError(f"model_args tokenizer_revision={value!r}: conserve tokenizes with "
                             "the model's own revision; drop tokenizer_revision=")


def _same_model(a: str, b: str) -> bool:
    from conserve_bench.engine.models import model_name

    return model_name(str(a)) == model_name(str(b))


def _refuse_unknown(args: dict[str, Any], known: Iterable[str]) -> None:
    known = list(known)
    takes = set(known) | set(REFUSED) | set(LM_EVAL_OPTIONS)
    unknown = sorted(set(args) - takes)
    if not unknown:
        return
    hints = [f"{name!r}" + (f" (did you mean {close[0]!r}?)"
                            if (close := difflib.get_close_matches(name, known, n=1)) else "")
             for name in unknown]
    raise ModelArgsError(f"unknown --model_args for conserve: {', '.join(hints)}; "
                         f"known: {', '.join(known)}")
