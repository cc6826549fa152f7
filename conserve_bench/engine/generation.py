"""Generations that survive an interruption: a `generate_until` item's tokens, continued.

Pure: no vLLM, no store, no clock. An item's text is a function of its generated token ids
alone: decoded whole, ended at the first token whose text completes a stop string (where the
engine stops) or at a stop token, cut with lm-eval's `until` semantics. So a generation
continued from any partial (prompt + the partial's tokens, `max_tokens` and `min_tokens`
reduced by as many), streamed in any deltas, gives the text of one uninterrupted run; tokens
past the stop never change it. Generation arguments vLLM applies to the tokens it generated
itself only (presence and frequency penalties, bad words) cannot continue: such a generation
starts over. Also owns which `gen_kwargs` reach vLLM's `SamplingParams` as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Decode = Callable[[Sequence[int]], str]  # token ids -> text, special tokens skipped


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """lm-eval's `until`: the text before each stop string, applied in order (as hf does)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def contains_stop(text: str, until: Sequence[str]) -> bool:
    return any(stop and stop in text for stop in until)


def num_tokens_to_stop(token_ids: Sequence[int], until: Sequence[str], decode: Decode) -> int | None:
    """The fewest leading tokens whose text contains a stop string (where the engine stops
    generating), or None when the text of all of them contains none."""
    if not contains_stop(decode(token_ids), until):
        return None
    # NOTE: a longer prefix decodes to a longer text that starts with the shorter one's, so
    # "contains a stop" is monotone in the prefix length and a bisection finds the first.
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if contains_stop(decode(token_ids[:mid]), until):
            hi = mid
        else:
            lo = mid + 1
    return hi


def generated_text(token_ids: Sequence[int], until: Sequence[str], decode: Decode) -> str:
    """An item's result: the text of its tokens up to where generation stops, cut at `until`."""
    end = num_tokens_to_stop(token_ids, until, decode)
    return cut_at_stops(decode(token_ids if end is None else token_ids[:end]), until)


# gen_kwargs handed to vLLM's SamplingParams under their own names, as lm-eval's `vllm` backend
# hands them (`jobs.genkwargs` checks each); lm-eval's own keys are `prompts._generation`'s.
SAMPLING_KEYS = frozenset({
    "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "logit_bias",
    "allowed_token_ids", "bad_words", "include_stop_str_in_output", "skip_special_tokens",
    "spaces_between_special_tokens",
})

# NOTE: vLLM applies these over the tokens it generated itself (`apply_penalties`' output
# counts, bad words matched against the output): a continued request holds the partial's
# tokens in its prompt, so it would sample differently. The repetition penalty covers prompt
# and output alike, and `min_tokens` is reduced by the partial (`continued`): those continue.
OUTPUT_ONLY_KEYS = ("presence_penalty", "frequency_penalty", "bad_words")


def sampling_kwargs(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `gen_kwargs` that vLLM's SamplingParams takes as they are (None:
    unset), `logit_bias`'s token ids as integers (JSON makes them strings)."""
    params = {k: v for k, v in gen_kwargs.items() if k in SAMPLING_KEYS and v is not None}
    if "logit_bias" in params:
        params["logit_bias"] = {int(t): float(b) for t, b in params["logit_bias"].items()}
    return params


def is_resumable(params: dict[str, Any]) -> bool:
    """Whether a generation may continue from a partial: greedy (the continuation is the
    uninterrupted run's), or sampled without a seed (a sample from the same distribution),
    and with no penalty counted over vLLM's own output (`OUTPUT_ONLY_KEYS`).
    NOTE: a seeded sample cannot be continued: the engine's random stream would restart."""
    if any(params.get(key) for key in OUTPUT_ONLY_KEYS):
        return False
    return not params.get("temperature") or params.get("seed") is None


def continued(prompt_ids: Sequence[int], params: dict[str, Any],
              partial: Sequence[int]) -> tuple[list[int], dict[str, Any]]:
    """The request that continues after `partial`: the prompt followed by it, `max_tokens`
    reduced by its length (so the whole generation keeps its limit), and `min_tokens` too
    (vLLM counts it over the tokens it generates, so the whole generation keeps its floor)."""
    params = {**params, "max_tokens": params["max_tokens"] - len(partial)}
    if params.get("min_tokens"):
        params["min_tokens"] = max(0, params["min_tokens"] - len(partial))
    return [*prompt_ids, *partial], params


@dataclass
class Generation:
    """One `generate_until` item on an engine: its tokens so far (the partial it continued
    from, then what the engine streamed), its limits, and whether it has ended.

    `extend` watches the seam of a continued generation: the engine checks stop strings over
    the text it generated itself, so a stop string that began in the partial and ends in
    the new tokens is found here, and the engine is told to stop.
    """

    key: str
    until: tuple[str, ...]
    max_tokens: int  # of the whole generation, over all its runs
    decode: Decode
    token_ids: list[int] = field(default_factory=list)
    num_resumed: int = 0  # tokens it continued from
    finished: bool = False
    stop_token_ids: frozenset[int] = frozenset()  # `gen_kwargs.stop_token_ids`
    _seam_chars: int | None = None  # text length of the partial while the seam is watched

    @classmethod
    def start(cls, key: str, until: Sequence[str], max_tokens: int, decode: Decode,
              partial: Sequence[int] = (), stop_token_ids: Sequence[int] = ()) -> Generation:
        seam = len(decode(partial)) if partial else None
        return cls(key, tuple(until), max_tokens, decode, list(partial), len(partial),
                   stop_token_ids=frozenset(stop_token_ids), _seam_chars=seam)

    def is_complete(self) -> bool:
        """Its tokens end it already: the length limit, a stop token or a stop string."""
        return (len(self.token_ids) >= self.max_tokens
                or not self.stop_token_ids.isdisjoint(self.token_ids)
                or contains_stop(self.decode(self.token_ids), self.until))

    def continued(self, prompt_ids: Sequence[int],
                  params: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """The engine request that generates the rest (`continued` after its tokens so far)."""
        return continued(prompt_ids, params, self.token_ids)

    def extend(self, token_ids: Sequence[int]) -> bool:
        """Append streamed tokens; True when a stop string straddling the seam has ended."""
        self.token_ids.extend(token_ids)
        if self._seam_chars is None or not token_ids:
            return False
        text = self.decode(self.token_ids)
        # NOTE: once the new text is as long as the longest stop string, no stop string can
        # straddle the seam any more; the engine's own checks cover the rest.
        if len(text) - self._seam_chars >= max(map(len, self.until), default=0):
            self._seam_chars = None
        return contains_stop(text, self.until)

    def text(self) -> str:
        return generated_text(self._until_stop_token(), self.until, self.decode)

    def _until_stop_token(self) -> list[int]:
        """Its tokens before the first stop token: vLLM ends there, and its text (lm-eval's
        `vllm` result) leaves the stop token out."""
        if self.stop_token_ids:
            for i, token_id in enumerate(self.token_ids):
                if token_id in self.stop_token_ids:
                    return self.token_ids[:i]
        return self.token_ids
