"""The step log's records: one JSON line per engine step, its batch shape and execution time.

Owns the shape rule (which scheduled request is a prefill chunk and which a decode), the line
format, and reading lines back as `latency.Sample`s. Plain data only: it must never import
torch or vLLM, nor read a clock; `vllm_plugin.steplog.StepRecorder` times and writes the
steps `vllm_plugin.scheduler.ConserveScheduler` hands it, and the profiler reads them.

    {"step_s": 0.0123, "prefills": [[256, 0, false]], "decodes": [64, 64, 65],
     "end_at": 1795012345.678, "offline_tokens": 256}

`end_at` (Unix time the step's output came back) lets a reader line steps up with events
measured elsewhere, such as a benchmark's window; the scheduler's notes ride along. A step the
worker abandoned at a layer safepoint has `"aborted": true`: its time is not a step's, so
`read_step_log` (what latency models are fitted on) leaves it out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conserve_bench.sched.latency import ChunkShape, Sample, StepShape


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step: `num_tokens` new tokens after `num_context` computed ones."""

    num_tokens: int
    num_context: int
    num_prompt_tokens: int
    prompt_logprobs: bool = False

    @property
    def is_prefill(self) -> bool:
        # NOTE: vLLM has no prefill phase; a request is prefilling while its computed tokens
        # have not yet covered its prompt (a resumed, preempted request prefills again).
        return self.num_context < self.num_prompt_tokens


def step_shape(requests: Iterable[ScheduledRequest]) -> StepShape:
    """The batch shape of one step, requests in scheduling order."""
    requests = list(requests)
    prefills = tuple(ChunkShape(r.num_tokens, r.num_context, r.prompt_logprobs)
                     for r in requests if r.is_prefill)
    decodes = tuple(r.num_context for r in requests if not r.is_prefill)
    return StepShape(prefills, decodes)


def to_line(sample: Sample, notes: dict[str, Any] | None = None) -> str:
    """One line; `notes` (the scheduler's plan: kind, predicted_s, budget_s) ride along."""
    prefills = [[c.num_tokens, c.num_context, c.prompt_logprobs] for c in sample.shape.prefills]
    return json.dumps({"step_s": sample.step_s, "prefills": prefills,
                       "decodes": list(sample.shape.decode_context_lens), **(notes or {})})


def from_line(line: str) -> Sample:
    return from_line_with_notes(line)[0]


def from_line_with_notes(line: str) -> tuple[Sample, dict[str, Any]]:
    """The sample, and everything else the line carries (`end_at`, the scheduler's notes)."""
    data = json.loads(line)
    prefills = tuple(ChunkShape(int(n), int(c), bool(lp)) for n, c, lp in data.pop("prefills"))
    shape = StepShape(prefills, tuple(int(c) for c in data.pop("decodes")))
    return Sample(shape, float(data.pop("step_s"))), data


def read_step_log(path: str | Path, offset: int = 0) -> tuple[list[Sample], int]:
    """Samples of the steps that ran to the end, written after byte `offset`, and the offset
    to continue from next time."""
    lines, offset = _read_lines(path, offset)
    steps = [from_line_with_notes(line) for line in lines]
    return [sample for sample, notes in steps if not notes.get("aborted")], offset


def read_step_log_with_notes(path: str | Path) -> list[tuple[Sample, dict[str, Any]]]:
    """Every step of the log as (sample, notes)."""
    return [from_line_with_notes(line) for line in _read_lines(path, 0)[0]]


def _read_lines(path: str | Path, offset: int) -> tuple[list[str], int]:
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    # NOTE: a line still being written has no newline yet; it is read on the next call.
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").splitlines()
    return [line for line in lines if line.strip()], offset + len(complete)


def log_size(path: str | Path) -> int:
    """Current end of the log: the offset from which only later steps are read."""
    path = Path(path)
    return path.stat().st_size if path.exists() else 0
