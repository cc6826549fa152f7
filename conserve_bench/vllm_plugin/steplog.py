"""The step log's recorder: times each step vLLM schedules and appends it to the log file.

`StepRecorder` pairs a scheduled step with its output and measures the time between (the
clocks are arguments, real ones by default); `StepLogWriter` appends the lines, in the
engine process that runs `scheduler.ConserveScheduler`. The records and their format are
`sched.steplog`'s; this module never decides what a step's shape is, and touches no vLLM name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from conserve_bench.sched.latency import Sample, StepShape
from conserve_bench.sched.steplog import ScheduledRequest, step_shape, to_line


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
