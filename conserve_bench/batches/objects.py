"""What OpenAI's clients read: the Batch and File objects, and the lines of output and error
files. Pure: built from plain values, no store, no vLLM.

Output and error lines are OpenAI's: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`. A request the endpoint answered 200 is an output line; one it
refused is an error line carrying the response (its body holds the error); one that never
ran (the window expired, the batch was cancelled) is an error line with `error.code` and no
response. Line ids and request ids are derived from the batch and the line, so a batch
computed again (after a crash, by another replica) writes the same files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

from conserve_bench.batches.lines import Line
from conserve_bench.errors import InvalidRequestError
from conserve_bench.store.batch_rows import Batch, RequestCounts
from conserve_bench.store.states import STAMPED_BATCH_STATUSES, BatchStatus

DEFAULT_COMPLETION_WINDOW = "24h"  # the only window OpenAI offers
MAX_COMPLETION_WINDOW_S = 7 * 24 * 3600
_WINDOW = re.compile(r"^([1-9][0-9]*)([hms])$")
_UNIT_S = {"h": 3600, "m": 60, "s": 1}


# NOTE: a batch may be cancelled while it may still run; finalizing ends it either way.
CANCELLABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
RUNNING = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


def window_seconds(window: str) -> int:
    """`completion_window` in seconds: OpenAI's "24h", or any `<n>h`, `<n>m`, `<n>s` up to a
    week (a nightly job's own deadline); InvalidRequestError otherwise."""
    match = _WINDOW.match(window or "")
    seconds = int(match[1]) * _UNIT_S[match[2]] if match else 0
    if not 0 < seconds <= MAX_COMPLETION_WINDOW_S:
        raise InvalidRequestError(f"completion_window must be like '24h' (at most 168h), got {window!r}")
    return seconds


def batch_object(batch: Batch, counts: RequestCounts, model: str | None = None,
                 progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's Batch object; `progress` (ours: rate, ETA) under `conserve`."""
    obj = {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status.value, "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id, "created_at": int(batch.created_at),
        "expires_at": int(batch.expires_at),
        **{f"{stamp}_at": _int(batch.stamps.get(stamp)) for stamp in STAMPED_BATCH_STATUSES},
        "request_counts": counts.to_dict(), "metadata": batch.metadata, "model": model,
        "usage": batch.usage,
    }
    if progress is not None:
        obj["conserve"] = progress
    return obj


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def progress(counts: RequestCounts, now: float, batch: Batch) -> dict[str, Any]:
    """How the batch goes: requests per second since it started running, the seconds the
    rest needs at that rate (`eta_s`, None before a rate is measured), and whether that fits
    the window (`finishes_in_window`, None while unknown)."""
    started = batch.stamps.get("in_progress")
    remaining = counts.total - counts.num_finished
    rate = eta_s = fits = None
    if started is not None and counts.num_finished > len(batch.line_errors) and now > started:
        rate = (counts.num_finished - len(batch.line_errors)) / (now - started)
        eta_s = remaining / rate
        fits = now + eta_s <= batch.expires_at
    if batch.status.is_final or batch.status == BatchStatus.FINALIZING:
        eta_s, fits = 0.0, batch.status != BatchStatus.EXPIRED
    return {"requests_per_s": None if rate is None else round(rate, 3),
            "eta_s": None if eta_s is None else round(eta_s, 1),
            "finishes_in_window": fits, "job_id": batch.job_id}


def file_object(file_id: str, purpose: str, filename: str, num_bytes: int,
                created_at: float) -> dict[str, Any]:
    """OpenAI's File object."""
    return {"id": file_id, "object": "file", "bytes": num_bytes, "created_at": int(created_at),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None}


def _line_id(batch_id: str, index: int, prefix: str) -> str:
    digest = hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()[:24]
    return f"{prefix}_{digest}"


def request_id(batch_id: str, index: int) -> str:
    """The id the line's request runs under (vLLM's `request_id`: its response's id names it)."""
    return _line_id(batch_id, index, "batchreq")


def response_line(batch_id: str, line: Line, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """The line of a request the endpoint answered: output file if 200, else error file."""
    return {"id": _line_id(batch_id, line.index, "batch_req"), "custom_id": line.custom_id,
            "response": {"status_code": status_code, "request_id": request_id(batch_id, line.index),
                         "body": body},
            "error": None}


def batch_usage(bodies: Iterable[dict[str, Any]]) -> dict[str, int | dict[str, int]]:
    """OpenAI's Batch `usage`: the token totals of the answered lines' response bodies (chat
    and text completions: prompt and completion tokens; embeddings: prompt tokens), with the
    prompt tokens vLLM's prefix cache served (`prompt_tokens_details`, when it reports them)."""
    num_in = num_out = num_cached = num_reasoning = 0
    for body in bodies:
        usage = body.get("usage") or {}
        num_in += usage.get("prompt_tokens") or 0
        num_out += usage.get("completion_tokens") or 0
        num_cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        num_reasoning += (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": num_in, "input_tokens_details": {"cached_tokens": num_cached},
            "output_tokens": num_out, "output_tokens_details": {"reasoning_tokens": num_reasoning},
            "total_tokens": num_in + num_out}


def unanswered_line(batch_id: str, line: Line, code: str, message: str) -> dict[str, Any]:
    """The error line of a request that never ran (`batch_expired`, `batch_cancelled`)."""
    return {"id": _line_id(batch_id, line.index, "batch_req"), "custom_id": line.custom_id,
            "response": None, "error": {"code": code, "message": message}}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


EXPIRED = ("batch_expired", "This request could not be executed before the completion window expired.")
CANCELLED = ("batch_cancelled", "This request was not executed: the batch was cancelled.")
