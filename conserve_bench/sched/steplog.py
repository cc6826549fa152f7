"""The step log: one JSON line per engine step, its batch shape and its model-execution time.

Owns the shape rule (which scheduled request is a prefill chunk and which a decode), the line
format, and reading lines back as `latency.Sample`s. Plain data only: it must never import
torch or vLLM; `scheduler.ConserveScheduler` hands it plain values and the profiler reads it.

    {"step_s": 0.0123, "prefills": [[256, 0, false]], "decodes": [64, 64, 65],
     "end_at": 1795012345.678, "offline_tokens": 256}

`end_at` (Unix time the step's output came back) lets a reader line steps up with events
measured elsewhere, such as a benchmark's window; the scheduler's notes ride along. A step the
worker abandoned at a layer safepoint has `"aborted": true`: its time is not a step's, so
`read_step_log` (what latency models are fitted on) leaves it out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from conserve_bench.engine.plugin import conserve_overrides
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


def recording_overrides(step_log: str | Path) -> dict[str, Any]:
    """`EngineConfig` fields that start vLLM with `ConserveScheduler` logging to `step_log`."""
    return conserve_overrides(step_log=str(step_log))


class StepLogWriter:
    """Appends samples to a JSON-lines file, opened lazily in the process that writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = None

    def write(self, sample: Sample, notes: dict[str, Any] | None = None) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        # NOTE: flushed per line, before the step's outputs reach the client, so a reader
        # that has seen a step's outputs also finds that step in the log.
        self._file.write(to_line(sample, notes) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


class StepRecorder:
    """Pairs each scheduled step with its executed output and logs its shape and time.

    `scheduled` is called when scheduling returns, `executed` when the step's output comes
    back; the time between is the step's model execution (forward pass and sampling). Without
    a writer it only times steps (for the live latency model).
    """

    def __init__(self, writer: StepLogWriter | None, clock: Callable[[], float] = time.perf_counter,
                 wall_clock: Callable[[], float] = time.time):
        self._writer = writer
        self._clock = clock
        self._wall_clock = wall_clock
        self._pending: dict[int, tuple[object, float, StepShape, dict[str, Any] | None]] = {}
        self._last_done_at = float("-inf")

    def scheduled(self, step: object, requests: Iterable[ScheduledRequest],
                  notes: dict[str, Any] | None = None) -> None:
        now = self._clock()
        shape = step_shape(requests)
        if shape.num_tokens:
            # NOTE: keyed by identity and holding `step` alive, so the id cannot be reused
            # by another object before this step's output comes back.
            self._pending[id(step)] = (step, now, shape, notes)

    def executed(self, step: object, notes: dict[str, Any] | None = None) -> Sample | None:
        """Log `step`, with `notes` added to those given when it was scheduled."""
        now = self._clock()
        entry = self._pending.pop(id(step), None)
        if entry is None:
            return None
        _, scheduled_at, shape, scheduled_notes = entry
        # NOTE: with a batch queue (async scheduling, pipeline parallelism) a step is scheduled
        # while the previous one still runs; it starts executing once that one is done.
        sample = Sample(shape, now - max(scheduled_at, self._last_done_at))
        self._last_done_at = now
        if self._writer is not None:
            self._writer.write(sample, {"end_at": round(self._wall_clock(), 6),
                                        **(scheduled_notes or {}), **(notes or {})})
        return sample

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
