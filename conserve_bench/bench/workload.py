"""Online workloads for `bench`: trace replay and synthetic Gamma arrivals, as plain data.

A workload is a list of `OnlineRequest`s (arrival time, prompt tokens, generated tokens),
sorted by arrival. Traces are read from the Azure LLM inference 2023 CSV format
(TIMESTAMP, ContextTokens, GeneratedTokens); arrivals keep the trace's shape and are
rescaled to a target rate. Everything here is pure and seeded: no vLLM, no HTTP, no clock.
"""

from __future__ import annotations

import csv
import itertools
import random
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from conserve_bench.errors import ConserveError

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# NOTE: prompt token ids are drawn from this range: above every tokenizer's special tokens at
# the bottom of the vocabulary and below 30k, inside any modern vocabulary (32k to 150k).
PROMPT_TOKEN_IDS = (100, 30_000)


class TraceError(ConserveError):
    pass


@dataclass(frozen=True)
class OnlineRequest:
    arrival_s: float  # since the start of the workload
    context_tokens: int
    generated_tokens: int


def read_azure_trace(path: str | Path, max_requests: int | None = None) -> list[OnlineRequest]:
    """The trace's requests, arrivals relative to its first timestamp. Example:

    read_azure_trace("../shared/data/traces/azure_llm_2023_conv.csv", max_requests=100)
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {str(path)!r} not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not set(TRACE_COLUMNS) <= set(reader.fieldnames or ()):
            raise TraceError(f"trace {str(path)!r} lacks columns {', '.join(TRACE_COLUMNS)}")
        rows = list(itertools.islice(reader, max_requests))
    if not rows:
        raise TraceError(f"trace {str(path)!r} has no requests")
    try:
        times = [_parse_timestamp(r["TIMESTAMP"]) for r in rows]
        requests = [OnlineRequest((t - times[0]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
                    for t, r in zip(times, rows)]
    except ValueError as e:
        raise TraceError(f"trace {str(path)!r}: {e}") from None
    return sorted(requests, key=lambda r: r.arrival_s)


def _parse_timestamp(text: str) -> float:
    # NOTE: the Azure traces carry 7 fractional digits, more than datetime parses.
    head, _, fraction = text.strip().partition(".")
    whole = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return whole + (float(f"0.{fraction}") if fraction else 0.0)


def mean_rate(requests: list[OnlineRequest]) -> float:
    """Requests per second: (n - 1) arrivals over the span from first to last (0 if none)."""
    span = requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0
    return (len(requests) - 1) / span if span > 0 else 0.0


def rescale_to_rate(requests: list[OnlineRequest], rate: float) -> list[OnlineRequest]:
    """Same shape (relative gaps), stretched or squeezed so that `mean_rate` == `rate`."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    start = requests[0].arrival_s if requests else 0.0
    span = requests[-1].arrival_s - start if requests else 0.0
    if span <= 0:
        return [replace(r, arrival_s=0.0) for r in requests]
    new_span = (len(requests) - 1) / rate
    # NOTE: position within the span first, so that a tiny span cannot overflow a factor.
    return [replace(r, arrival_s=(r.arrival_s - start) / span * new_span) for r in requests]


def gamma_arrivals(num_requests: int, rate: float, cv: float, seed: int) -> list[float]:
    """Arrival times of a Gamma renewal process: mean gap 1/rate, gap CV `cv` (1 = Poisson)."""
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be positive")
    shape = 1.0 / cv**2
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(num_requests):
        arrivals.append(t)
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
    return arrivals


def with_arrivals(requests: list[OnlineRequest], arrivals: list[float]) -> list[OnlineRequest]:
    """The requests' token counts, in order, on new arrival times."""
    return [replace(r, arrival_s=t) for r, t in zip(requests, sorted(arrivals))]


def fixed_requests(num_requests: int, context_tokens: int, generated_tokens: int) -> list[OnlineRequest]:
    """Requests of one size, all at t=0 (give them arrivals with `with_arrivals`)."""
    return [OnlineRequest(0.0, context_tokens, generated_tokens)] * num_requests


def scale_tokens(requests: list[OnlineRequest], token_scale: float, max_context_tokens: int,
                 max_generated_tokens: int) -> list[OnlineRequest]:
    """Token counts multiplied by `token_scale`, then capped; never below 1 token."""
    return [replace(r, context_tokens=_scaled(r.context_tokens, token_scale, max_context_tokens),
                    generated_tokens=_scaled(r.generated_tokens, token_scale, max_generated_tokens))
            for r in requests]


def _scaled(num_tokens: int, scale: float, cap: int) -> int:
    return max(1, min(cap, round(num_tokens * scale)))


def prompt_token_ids(num_tokens: int, seed: int, index: int) -> list[int]:
    """Exactly `num_tokens` random token ids, reproducible per (seed, request index).

    NOTE: random rather than repeated ids, so that no two prompts share a prefix and the
    prefix cache makes no online prefill cheaper than the trace says.
    """
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(*PROMPT_TOKEN_IDS) for _ in range(num_tokens)]
