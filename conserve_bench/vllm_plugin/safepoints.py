"""Layer-wise preemption, worker side: what a step carries from the scheduler (`StepMeta`:
its arming, and its KV copies for checkpointing), the safepoint every k attention layers that
abandons an armed step while an admitted online request waits for the engine (`Safepoints`,
raising `StepAborted`), and what an abandoned step reports back (`AbortReport`). Past its
`run_out_from` share of the layers an armed step is let run to the end instead (what is left
fits in the wait an arrival may have: `policy.run_out_share`), and reports that
(`RunOutReport`). A step that is not armed pays nothing at a safepoint: no clock, no read, no
device sync. Plain Python on vLLM's connector metadata classes: the connector's worker half
(`connector_worker`) calls it from vLLM's `save_kv_layer`; it never touches a tensor. vLLM
names relied on: docs/vllm-contract.md#connector."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class StepMeta(KVConnectorMetadata):
    """What the worker learns about a step from the scheduler."""

    step_index: int  # steps numbered by the scheduler-side connector, from 1
    cut_above: int | None = None  # armed: cut once more arrivals are announced; None: never
    forced_abort_layer: int | None = None  # the fault hook's: cut at this layer's safepoint
    run_out_from: float = 1.0  # share of the layers from which an arrival lets it run out
    # ... and only while what is left, at the pace of its layers so far, fits in this wait
    run_out_wait_s: float = math.inf
    saves: tuple[tuple[int, int], ...] = ()  # (device block, host slot), after the step
    loads: tuple[tuple[int, int], ...] = ()  # (host slot, device block), before the step
    flush: bool = False  # requests with checkpoints were preempted: finish every save first


@dataclass
class AbortReport(KVConnectorWorkerMetadata):
    """A step the worker abandoned, sent back with its empty output."""

    step_index: int
    layer: int  # attention layers completed when it stopped
    num_layers: int
    arrival_ns: int  # when the last arrival was announced (0 when the fault hook cut it)
    num_announced: int  # arrivals announced when it was cut (each is settled by the cut)
    aborted_at_ns: int
    layer_group_s: float  # how long the layer group that ended at the safepoint took

    @property
    def arrival_to_abort_s(self) -> float | None:
        return (self.aborted_at_ns - self.arrival_ns) / 1e9 if self.arrival_ns else None

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        return self  # NOTE: one worker: tensor and pipeline parallel size 1 are requirements


@dataclass
class RunOutReport(KVConnectorWorkerMetadata):
    """An armed step an arrival came during, let run to the end: little of it was left."""

    step_index: int
    layer: int  # attention layers completed at the safepoint that saw the arrival
    num_layers: int
    arrival_ns: int  # when the last arrival was announced
    num_announced: int  # arrivals announced then (each is settled by this step, as by a cut)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        return self  # NOTE: one worker, as for `AbortReport`


class StepAborted(Exception):
    def __init__(self, report: AbortReport):
        super().__init__(f"step {report.step_index} abandoned at layer {report.layer}")
        self.report = report


class Event(Protocol):
    def record(self) -> None: ...
    def synchronize(self) -> None: ...


class ArrivalReader(Protocol):
    def num_announced(self) -> int: ...
    def last_arrival_ns(self) -> int: ...


class RunAheadBound:
    """Keeps the CPU at most one layer group ahead of the device (CUDA only).

    CUDA kernels launch asynchronously: without a bound the CPU would pass every safepoint
    while the device is still on the first layers, and an abort would cut nothing. At each
    safepoint it records an event and waits for the one recorded at the safepoint before.
    Two events alternate: one is recorded while the other is waited on.
    """

    def __init__(self, events: tuple[Event, Event]):
        self._events = events
        self._num_recorded = 0

    def at_safepoint(self) -> None:
        self._events[self._num_recorded % 2].record()
        if self._num_recorded:
            self._events[(self._num_recorded - 1) % 2].synchronize()
        self._num_recorded += 1

    def drain(self) -> None:
        """Wait for everything launched so far (before the step's buffers are reused)."""
        if self._num_recorded:
            self._events[(self._num_recorded - 1) % 2].synchronize()

    def reset(self) -> None:
        self._num_recorded = 0


class Safepoints:
    """The worker's per-step layer count, and the decision taken at every k-th layer."""

    def __init__(self, every: int, num_layers: int, arrivals: ArrivalReader | None = None,
                 bound: RunAheadBound | None = None, clock: Callable[[], int] = time.monotonic_ns):
        self.every, self.num_layers = every, num_layers
        self._arrivals, self._bound, self._clock = arrivals, bound, clock
        self.meta: StepMeta | None = None
        self.report: AbortReport | None = None
        self.run_out: RunOutReport | None = None
        self._layer = 0
        self._started_ns = self._group_started_ns = 0

    def begin(self, meta: StepMeta) -> None:
        self.meta, self.report, self.run_out, self._layer = meta, None, None, 0
        self._started_ns = self._group_started_ns = self._clock()

    def after_layer(self) -> None:
        self._layer += 1
        if self._layer % self.every == 0 and self._layer < self.num_layers:
            self._safepoint()

    def end(self) -> None:
        if self._bound is not None:
            self._bound.reset()

    def _runs_out(self, meta: StepMeta, now_ns: int) -> bool:
        """Past the share of the layers the plan armed, with what is left at the pace of the
        layers so far within the wait. NOTE: the pace too: a step planned at 108 ms ran 297 ms
        on a busy host, and its run-out from layer 26 of 30 made the arrival wait 137 ms."""
        if self._layer < meta.run_out_from * self.num_layers:
            return False
        left_s = (now_ns - self._started_ns) / 1e9 * (self.num_layers - self._layer) / self._layer
        return left_s <= meta.run_out_wait_s

    def _safepoint(self) -> None:
        meta = self.meta
        if meta is None or meta.cut_above is None or self.run_out is not None:
            return  # NOTE: first: a step that cannot be cut waits on nothing here
        if self._bound is not None:
            self._bound.at_safepoint()
        now = self._clock()
        group_s, self._group_started_ns = (now - self._group_started_ns) / 1e9, now
        announced = self._arrivals.num_announced() if self._arrivals is not None else 0
        arrived = announced > meta.cut_above
        forced = meta.forced_abort_layer is not None and self._layer >= meta.forced_abort_layer
        if arrived and not forced and self._runs_out(meta, now):
            self.run_out = RunOutReport(meta.step_index, self._layer, self.num_layers,
                                        self._arrivals.last_arrival_ns(), announced)
            return
        if arrived or forced:
            if self._bound is not None:
                self._bound.drain()  # NOTE: vLLM reuses pinned input buffers next step
            self.report = AbortReport(meta.step_index, self._layer, self.num_layers,
                                      self._arrivals.last_arrival_ns() if arrived else 0,
                                      announced, self._clock(), group_s)
            raise StepAborted(self.report)
