"""Layer-wise preemption, scheduler side: arm offline-only steps, undo an abandoned one.

After vLLM has scheduled a step whose requests are all offline, `LayerPreemption` arms it
(the connector's metadata gets the count of arrivals above which it is cut) and records what
the step changed. If the worker abandons the step at a safepoint, `undo` puts vLLM's
state back before vLLM reads the empty output: computed tokens back to where the step began,
the blocks it filled removed from the prefix cache (their KV is half written), and requests
the step admitted back to the waiting queue. It never touches a step that ran to the end; a
step the worker let run out past an arrival (`ran_out`) settles that arrival as a cut would.

Which arrivals still cut a step (`sched.arrivals.ArrivalBook`) is the policy's: this adapter
tells it which online requests each step scheduled and which arrivals a cut was for, and reads
vLLM's state. vLLM names relied on: docs/vllm-contract.md#preemption.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from conserve_bench.sched.arrivals import ArrivalBook
from conserve_bench.vllm_plugin.overrides import arrival_number, is_online


@dataclass(frozen=True)
class ArmedStep:
    """What an armed step changed in vLLM's scheduler state, to undo it."""

    num_tokens: tuple[tuple[str, int], ...]  # (request id, tokens scheduled)
    admitted_ids: frozenset[str]  # came out of the waiting queue in this step
    filled_block_ids: frozenset[int]  # blocks it fills: hashed for the prefix cache already


def filled_blocks(block_ids: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """The blocks that computing tokens [start, end) completes (vLLM hashes them when it
    schedules the step, so the prefix cache offers them before their KV is written)."""
    return list(block_ids[start // block_size: end // block_size])


class LayerPreemption:
    """`ConserveScheduler`'s part for steps the worker may abandon (see module docstring)."""

    def __init__(self, scheduler, connector):
        self.scheduler, self.connector = scheduler, connector
        self.armed: tuple[object, ArmedStep] | None = None
        self.arrivals = ArrivalBook()
        self._was_prefill_chunk: dict[str, bool] = {}

    def before_schedule(self) -> None:
        """Note what vLLM's schedule() overwrites and a rollback has no other way to know."""
        self._was_prefill_chunk = {r.request_id: r.is_prefill_chunk for r in self.scheduler.running}

    def after_schedule(self, output, offline_only: bool, run_out_from: float = 1.0,
                       run_out_wait_s: float = math.inf) -> None:
        """Settle the arrivals whose requests `output` schedules first; arm it if it runs
        offline requests only (and no multimodal input, whose encoder outputs a rollback would
        not restore), to be cut before its `run_out_from` share of the layers or while more
        than `run_out_wait_s` of it is left."""
        self.armed = None
        for new in output.scheduled_new_reqs:
            request = self.scheduler.requests[new.req_id]
            if is_online(request.priority) and (number := arrival_number(request)) is not None:
                self.arrivals.scheduled(number)
        requests = [self.scheduler.requests[r] for r in output.num_scheduled_tokens]
        if not offline_only or any(r.has_encoder_inputs for r in requests):
            return
        self.connector.arm(output, self.arrivals.cut_above, run_out_from, run_out_wait_s)
        self.armed = (output, self._record(output))

    def holds_offline(self, limit_s: Callable[[], float]) -> bool:
        """Whether offline work waits for an online request in its hand-off: a step was cut
        for its arrival less than `limit_s()` ago and no step has scheduled it yet. NOTE:
        `limit_s` is asked only then: pricing it (the quantum, four predictions) took a tenth
        of the scheduler's time in every step."""
        return self.arrivals.awaits() and self.arrivals.in_hand_off(time.monotonic(), limit_s())

    def armed_step(self, output) -> ArmedStep | None:
        return self.armed[1] if self.armed is not None and self.armed[0] is output else None

    def _record(self, output) -> ArmedStep:
        scheduler = self.scheduler
        filled: set[int] = set()
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = scheduler.requests[req_id]
            # NOTE: schedule() has advanced num_computed_tokens by this step's tokens already;
            # vLLM hashes full blocks up to min(that, num_tokens).
            (block_ids,) = scheduler.kv_cache_manager.get_block_ids(req_id)
            filled.update(filled_blocks(block_ids, request.num_computed_tokens - num_tokens,
                                        min(request.num_computed_tokens, request.num_tokens),
                                        scheduler.block_size))
        admitted = {r.req_id for r in output.scheduled_new_reqs}
        admitted |= set(output.scheduled_cached_reqs.resumed_req_ids)
        return ArmedStep(tuple(output.num_scheduled_tokens.items()), frozenset(admitted),
                         frozenset(filled))

    def ran_out(self, num_announced: int) -> None:
        """The worker let the armed step run to the end past an arrival (little of it was
        left): the `num_announced` arrivals are settled as if it had been cut for them, and
        offline work waits for their requests (their hand-off) as after a cut."""
        self.armed = None
        self.arrivals.cut_for(num_announced, time.monotonic())

    def undo(self, step: ArmedStep, num_announced: int) -> None:
        """Roll vLLM's scheduler back to before `step` (whose worker abandoned it when
        `num_announced` arrivals were announced: none of them cuts a step again)."""
        scheduler = self.scheduler
        self.armed = None
        self.arrivals.cut_for(num_announced, time.monotonic())
        # NOTE: first out of the prefix cache, then free: a block freed with its hash would
        # stay on offer, half written, to the next request with the same prefix.
        scheduler.kv_cache_manager.evict_blocks(set(step.filled_block_ids))
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        for req_id, num_tokens in step.num_tokens:
            request = scheduler.requests.get(req_id)
            if request is None or request.is_finished():
                continue  # NOTE: aborted by its client while the step ran; already freed
            request.num_in_flight_tokens -= num_tokens
            request.num_computed_tokens -= num_tokens
            request.is_prefill_chunk = self._was_prefill_chunk.get(req_id, request.is_prefill_chunk)
            if req_id in manager.num_cached_block:  # hashed again once really computed
                manager.num_cached_block[req_id] = min(manager.num_cached_block[req_id],
                                                       request.num_computed_tokens // scheduler.block_size)
        self._readmit([r for r in scheduler.running if r.request_id in step.admitted_ids])

    def _readmit(self, requests) -> None:
        """Back to the waiting queue, as vLLM preempts: their prefix-cache hit may have been
        on blocks this step filled, and is looked up again when they are admitted next."""
        now = time.monotonic()
        for request in reversed(requests):  # NOTE: each is prepended: keeps their queue order
            self.scheduler.running.remove(request)
            self.scheduler._preempt_request(request, now)
