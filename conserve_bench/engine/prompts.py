"""lm-eval requests -> engine prompts -> item results, with lm-eval's own semantics.

Everything here works on token sequences and plain data; nothing imports vLLM. A work item
(one lm-eval request) becomes one or more `Prompt`s; each prompt carries the `Part`s that read
its output. The engine submits prompts and feeds finished outputs back through `Assembler`,
which folds parts into item results:

- loglikelihood -> [logprob, is_greedy]
- loglikelihood_rolling -> logprob (sum over disjoint windows)
- generate_until -> text (from its tokens, `generation.py`)

Tokenization follows lm-eval's `TemplateLM`: trailing context whitespace moves to the
continuation, the pair is encoded whole and split at the context length, an empty context is
replaced by the prefix token. Single-token continuations that share a context are scored by
one prompt (the context alone, reading the next-token logprobs of the candidate tokens):
MMLU's four choices cost one prefill, and that prefill can hit the prefix cache, which
prompt-logprob requests never do.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Protocol

from conserve_bench.engine.generation import sampling_kwargs

KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
MAX_SCORED_TOKENS = 128  # vLLM 0.32.0's MAX_LOGPROB_TOKEN_IDS
DEFAULT_MAX_GEN_TOKS = 256


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class Request(Protocol):
    """One lm-eval request as the engine computes it: its item key, kind (one of KINDS) and
    lm-eval's arguments. The store's `WorkItem` satisfies it; the engine never imports it."""

    key: str
    kind: str
    args: Any


def check_request_args(kind: str, args: Any) -> None:
    """Raise ValueError unless `args` has the shape lm-eval gives requests of `kind`."""
    shapes = {"loglikelihood": (str, str), "loglikelihood_rolling": (str,),
              "generate_until": (str, dict)}
    if kind not in shapes:
        raise ValueError(f"unknown request kind {kind!r} (expected one of {', '.join(KINDS)})")
    shape = shapes[kind]
    if (not isinstance(args, (list, tuple)) or len(args) != len(shape)
            or not all(isinstance(a, t) for a, t in zip(args, shape))):
        names = ", ".join(t.__name__ for t in shape)
        raise ValueError(f"{kind} arguments must be [{names}]")


# -- parts: how to read one engine output into one item's partial result -------------------


@dataclass(frozen=True)
class NextTokenScore:
    """Logprob of `token_id` right after the prompt; greedy iff it is what greedy sampling picks."""

    key: str
    token_id: int

    def read(self, out) -> tuple[float, bool]:
        completion = out.outputs[0]
        logprob = completion.logprobs[0][self.token_id].logprob
        return logprob, completion.token_ids[0] == self.token_id


@dataclass(frozen=True)
class PromptScore:
    """Sum of prompt logprobs from position `start` on; greedy iff every token ranked first."""

    key: str
    start: int

    def read(self, out) -> tuple[float, bool]:
        total, greedy = 0.0, True
        for token_id, logprobs in zip(out.prompt_token_ids[self.start :],
                                      out.prompt_logprobs[self.start :]):
            scored = logprobs[token_id]
            total += scored.logprob
            greedy = greedy and scored.rank == 1
        return total, greedy


@dataclass(frozen=True)
class GeneratedText:
    """The generated text, cut at `until`; read from the item's `generation.Generation`
    (all its tokens, a partial it continued from included), never from the engine's text."""

    key: str
    until: tuple[str, ...]

    def read(self, generation) -> str:
        return generation.text()


Part = NextTokenScore | PromptScore | GeneratedText


@dataclass
class Prompt:
    token_ids: list[int]
    params: dict[str, Any]  # keyword arguments of vllm.SamplingParams
    parts: list[Part] = field(default_factory=list)

    @property
    def generates(self) -> bool:
        """A generation (one `generate_until` item), rather than a scored prompt."""
        return any(isinstance(part, GeneratedText) for part in self.parts)


# -- building prompts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """lm-eval's tokenization rules for one tokenizer and the engine's context length.

    `max_model_len` is what lm-eval's `hf` backend calls `max_length` (the model's own,
    unless the KV cache capped it). NOTE: vLLM keeps one position for the token it always
    generates, so a prompt holds at most `max_prompt_len` tokens, where hf scores windows of
    `max_length + 1`: any context and continuation that fit in `max_prompt_len` tokens are
    scored whole, exactly as hf scores them; longer ones are cut from the left like hf's, two
    tokens shorter. `add_bos_token` is lm-eval `vllm`'s model_arg (`encode`).
    """

    tokenizer: Tokenizer
    max_model_len: int
    add_bos_token: bool = False

    @property
    def max_prompt_len(self) -> int:
        return self.max_model_len - 1

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """`text`'s tokens, as lm-eval's `vllm` backend encodes them (`VLLM.tok_encode`):
        with `add_bos_token`, after the BOS token, unless the text begins with it already (a
        chat-templated prompt)."""
        if not text:
            return []
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        if not self.add_bos_token or bos is None or text.startswith(self.tokenizer.decode([bos])):
            return ids
        # NOTE: lm-eval builds its tokenizer with `add_bos_token=True` and encodes with the
        # special tokens; for a tokenizer that adds no EOS that is the BOS token, then the text.
        return [bos, *ids]

    def encode_pair(self, context: str, continuation: str,
                    contexts: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
        """lm-eval's (context, continuation) tokens. `contexts`: contexts encoded already
        (read and filled), so that a question's choices encode their shared context once."""
        if context == "":
            cont = self.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        num_spaces = len(context) - len(context.rstrip())
        if num_spaces:
            context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
        # NOTE: exactly lm-eval's split: the context as encoded alone, the continuation as the
        # rest of the whole encoding (even where a token straddles the boundary).
        ctx = contexts.get(context) if contexts is not None else None
        if ctx is None:
            ctx = self.encode(context)
            if contexts is not None:
                contexts[context] = ctx
        return ctx, self.encode(context + continuation)[len(ctx):]

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        # NOTE: here, not at the top: the CLI imports this module, and a client install
        # (`pip install "conserve-bench[client]"`) has no lm-eval
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(
            token_list=self.encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_prompt_len - 1, context_len=1,
        )
        return [make_disjoint_window(w) for w in windows]


def build_prompts(work: Sequence[Request], encoder: Encoder) -> tuple[list[Prompt], dict[str, int]]:
    """Turn work items into engine prompts; returns the prompts and each item's part count."""
    prompts: list[Prompt] = []
    num_parts: dict[str, int] = {}
    shared: dict[tuple[int, ...], Prompt] = {}
    contexts: dict[str, list[int]] = {}  # NOTE: an MMLU question's 4 choices share a context
    for item in work:
        if item.kind == "loglikelihood":
            prompt = _loglikelihood(item, encoder, shared, contexts)
        elif item.kind == "loglikelihood_rolling":
            windows = _rolling(item, encoder)
            prompts += windows
            num_parts[item.key] = len(windows)
            continue
        elif item.kind == "generate_until":
            prompt = _generation(item, encoder)
        else:
            raise ValueError(f"unknown request kind {item.kind!r}")
        num_parts[item.key] = 1
        if prompt is not None:
            prompts.append(prompt)
    return prompts, num_parts


def _loglikelihood(item: Request, encoder: Encoder, shared: dict, contexts: dict) -> Prompt | None:
    context, continuation = item.args
    ctx, cont = encoder.encode_pair(context, continuation, contexts)
    if len(cont) == 1 and 0 < len(ctx) <= encoder.max_prompt_len:
        # NOTE: one prompt per distinct context; returns None when an earlier item's prompt
        # already covers this context, so the caller adds nothing.
        prompt = shared.get(tuple(ctx))
        is_new = prompt is None or len(prompt.parts) >= MAX_SCORED_TOKENS
        if is_new:
            prompt = Prompt(ctx, {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": []})
            shared[tuple(ctx)] = prompt
        prompt.params["logprob_token_ids"].append(cont[0])
        prompt.parts.append(NextTokenScore(item.key, cont[0]))
        return prompt if is_new else None
    return _scored_prompt(item.key, ctx, cont, encoder.max_prompt_len)


def _rolling(item: Request, encoder: Encoder) -> list[Prompt]:
    (text,) = item.args
    return [_scored_prompt(item.key, ctx, cont, encoder.max_prompt_len)
            for ctx, cont in encoder.rolling_windows(text)]


def _scored_prompt(key: str, ctx: list[int], cont: list[int], max_prompt_len: int) -> Prompt:
    # NOTE: like lm-eval, keep the last tokens that fit; the first one is never scored.
    tokens = (ctx + cont)[-max_prompt_len:]
    start = max(len(tokens) - len(cont), 1)
    params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
    return Prompt(tokens, params, [PromptScore(key, start)])


def _generation(item: Request, encoder: Encoder) -> Prompt:
    context, gen_kwargs = item.args
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    eos = encoder.tokenizer.decode([encoder.tokenizer.eos_token_id])
    if eos not in until:
        until.append(eos)
    # NOTE: lm-eval's names for the tokens to generate, in its order (`normalize_gen_kwargs`)
    max_gen_toks = int(next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens",
                                                 "max_completion_tokens") if kwargs.get(k)),
                            DEFAULT_MAX_GEN_TOKS))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if not kwargs.pop("do_sample", temperature > 0):
        temperature = 0.0
    # NOTE: the rest reach vLLM as lm-eval's `vllm` hands them on; keys of no SamplingParams
    # field (another backend's, from a task's YAML) are dropped
    params = {**sampling_kwargs(kwargs), "max_tokens": max_gen_toks, "temperature": temperature,
              "stop": until}
    # NOTE: lm-eval's hf keeps the last `max_length - max_gen_toks` context tokens, so that
    # prompt and generation fit in the model's context together.
    ctx = encoder.encode(context)[-max(1, encoder.max_model_len - max_gen_toks):]
    return Prompt(ctx, params, [GeneratedText(item.key, tuple(until))])


# -- folding outputs back into item results ---------------------------------------------------


class Assembler:
    """Collects partial results per item and reports items whose parts are all in."""

    def __init__(self):
        self._expected: dict[str, int] = {}
        self._partial: dict[str, list] = defaultdict(list)
        self._kind: dict[str, str] = {}

    def expect(self, work: Sequence[Request], num_parts: dict[str, int]) -> None:
        for item in work:
            self._expected[item.key] = num_parts[item.key]
            self._kind[item.key] = item.kind

    def add(self, prompt: Prompt, output) -> list[tuple[str, Any]]:
        finished = []
        for part in prompt.parts:
            if part.key not in self._expected:
                continue  # the item failed through another of its prompts
            self._partial[part.key].append(part.read(output))
            if len(self._partial[part.key]) == self._expected[part.key]:
                finished.append((part.key, self._fold(part.key)))
        return finished

    def drop(self, prompt: Prompt) -> list[str]:
        """Forget the items `prompt` is part of (their request failed); their keys."""
        keys = [key for key in dict.fromkeys(part.key for part in prompt.parts) if key in self._expected]
        for key in keys:
            self._partial.pop(key, None)
            del self._kind[key], self._expected[key]
        return keys

    def _fold(self, key: str) -> Any:
        values = self._partial.pop(key)
        kind = self._kind.pop(key)
        del self._expected[key]
        if kind == "loglikelihood_rolling":
            return sum(logprob for logprob, _ in values)
        if kind == "loglikelihood":
            logprob, greedy = values[0]
            return [logprob, greedy]
        return values[0]

    @property
    def num_pending(self) -> int:
        return len(self._expected)
