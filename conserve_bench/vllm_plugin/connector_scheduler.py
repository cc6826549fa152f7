"""The connector's scheduler half: numbers and arms steps, and plans incremental KV checkpoints.

`ConnectorScheduler` runs in vLLM's scheduler process, called by `connector.ConserveConnector`
(vLLM's hooks) and by `scheduler.ConserveScheduler` (`arm`, `step_finished`). It turns vLLM's
scheduler state into `sched.kv_checkpoints.CheckpointBook` calls (`Checkpoints`) and each
step's arming and block copies into its `StepMeta`, for the worker half. It never copies a
byte and never decides which step to arm. vLLM names relied on:
docs/vllm-contract.md#connector-scheduler-half.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from conserve_bench.sched.kv_checkpoints import CheckpointBook, Resume
from conserve_bench.vllm_plugin.arrivals import hooked_ints
from conserve_bench.vllm_plugin.overrides import (ConnectorConfig, is_online, wants_prompt_logprobs,
                                                  write_state)
from conserve_bench.vllm_plugin.safepoints import StepMeta

STATE_EVERY_S = 1.0  # how often the checkpoint pool's use is written for `/metrics`


class ConnectorScheduler:
    """The scheduler half of `ConserveConnector` (see the module docstring)."""

    def __init__(self, config: ConnectorConfig, num_pool_slots: int, block_size: int,
                 block_bytes: int):
        self._abort_layer = hooked_ints("connector.abort_layer")
        self._attempted: set[tuple] = set()  # fault hook: work already cut once
        self._num_steps = 0
        self.checkpoints = Checkpoints(config, num_pool_slots, block_size, block_bytes)

    def build_meta(self, scheduler_output, kv_cache_manager) -> StepMeta:
        self._num_steps += 1
        return self.checkpoints.step_meta(self._num_steps, scheduler_output, kv_cache_manager)

    def arm(self, scheduler_output, cut_above: int, run_out_from: float = 1.0,
            run_out_wait_s: float = math.inf) -> None:
        """Let this step be abandoned at a safepoint once more than `cut_above` arrivals are
        announced, before its `run_out_from` share of the layers or while more than
        `run_out_wait_s` of it is left (called by the scheduler on offline-only steps, after
        scheduling)."""
        meta = scheduler_output.kv_connector_metadata
        scheduler_output.kv_connector_metadata = dataclasses.replace(
            meta, cut_above=cut_above, forced_abort_layer=self._forced_layer(scheduler_output),
            run_out_from=run_out_from, run_out_wait_s=run_out_wait_s)

    def _forced_layer(self, scheduler_output) -> int | None:
        """The `connector.abort_layer` fault hook's layer, the first time this work is tried."""
        layer = self._abort_layer.read() if self._abort_layer is not None else 0
        if layer <= 0:
            return None
        work = _work_signature(scheduler_output)
        if work in self._attempted:
            return None
        self._attempted.add(work)
        return layer

    def num_matched_tokens(self, request, num_computed_tokens: int) -> int:
        return self.checkpoints.num_matched_tokens(request, num_computed_tokens)

    def admitted(self, request, block_ids: list[int], num_loaded: int) -> None:
        self.checkpoints.admitted(request, block_ids, num_loaded)

    def release(self, req_id: str) -> None:
        self.checkpoints.release(req_id)

    def step_finished(self, ran: bool) -> None:
        """The step last planned came back (called by `ConserveScheduler` before vLLM reads
        it): commit its checkpoints if it `ran` to the end, else drop them."""
        self.checkpoints.step_finished(ran)

    def take_resumes(self) -> list[Resume]:
        return self.checkpoints.take_resumes()


class Checkpoints:
    """Checkpointing, scheduler side: vLLM's scheduler state into `CheckpointBook` calls, and
    each step's copies out (in the step's `StepMeta`).

    Only offline requests without prompt logprobs are checkpointed: online requests are never
    preempted for offline ones, and a prompt-logprob request never reads cached KV in vLLM
    (`Request.skip_reading_prefix_cache`), so a checkpoint could not be loaded for it.
    """

    def __init__(self, config: ConnectorConfig, num_slots: int, block_size: int, block_bytes: int):
        self.book = CheckpointBook(num_slots, block_size)
        self._block_bytes = block_bytes
        self._max_blocks = hooked_ints("kv_checkpoints.max_blocks")
        self._state_path = config.checkpoint_state_path
        self._state_written_at = float("-inf")
        self._local: dict[str, int] = {}  # vLLM's prefix-cache hit of requests being admitted
        self._loads: list[tuple[int, int]] = []
        self._progress: tuple[tuple[str, int], ...] = ()  # computed tokens once the step ends
        self._resumes: list[Resume] = []
        self.num_loaded_tokens = self.num_recomputed_tokens = self.num_resumes = 0

    def num_matched_tokens(self, request, num_local: int) -> int:
        if not self.book.is_tracked(request.request_id) or request.skip_reading_prefix_cache:
            return 0
        self._local[request.request_id] = num_local
        return self.book.num_matched_tokens(request.request_id, request.num_tokens, num_local)

    def admitted(self, request, block_ids: list[int], num_loaded: int) -> None:
        """A waiting request got its blocks: a new one is tracked, a resumed one loaded."""
        req_id = request.request_id
        num_local = self._local.pop(req_id, 0)
        if not checkpointable(request):
            return
        if not self.book.is_tracked(req_id):
            self.book.track(req_id, request.arrival_time)
            return
        if num_loaded:
            loads, resume = self.book.plan_load(req_id, num_local, num_loaded, block_ids)
            self._loads += [(load.slot, load.block_id) for load in loads]
        else:
            resume = self.book.resumed_without_load(req_id, num_local)
        if resume is not None:
            self._resumes.append(resume)
            self.num_resumes += 1
            self.num_loaded_tokens += resume.num_loaded
            self.num_recomputed_tokens += resume.num_recomputed

    def step_meta(self, step_index: int, output, kv_cache_manager) -> StepMeta:
        """The step's metadata with its copies: loads planned at admission, saves of the full
        blocks its tracked requests will have computed once it ends."""
        flushed = self.book.mark_preempted(output.preempted_req_ids)
        if self._max_blocks is not None:
            limit = self._max_blocks.read()
            self.book.set_capacity(limit - 1 if limit > 0 else self.book.num_slots)
        committed = [(req_id, num_before + num_tokens, kv_cache_manager.get_block_ids(req_id)[0])
                     for req_id, num_before, num_tokens in _scheduled(output)
                     if self.book.is_tracked(req_id)]
        saves = self.book.plan_saves(committed)
        self._progress = tuple((req_id, num_computed) for req_id, num_computed, _ in committed)
        loads, self._loads, self._local = tuple(self._loads), [], {}
        return StepMeta(step_index, saves=tuple((s.block_id, s.slot) for s in saves),
                        loads=loads, flush=bool(flushed))

    def step_finished(self, ran: bool) -> None:
        self.book.finish_step(ran, self._progress)
        self._progress = ()
        self._write_state()

    def release(self, req_id: str) -> None:
        """A request finished or was aborted: its checkpoint is freed."""
        self.book.release(req_id)
        if not self.book.stats().num_requests:
            self._write_state(force=True)  # NOTE: an idle engine writes nothing else

    def take_resumes(self) -> list[Resume]:
        resumes, self._resumes = self._resumes, []
        return resumes

    def state(self) -> dict[str, Any]:
        """The pool's use and the totals since start (what `/metrics` shows)."""
        stats = self.book.stats()
        return {"pool_bytes": stats.num_slots * self._block_bytes,
                "used_bytes": stats.num_used * self._block_bytes, "requests": stats.num_requests,
                "saved_blocks": stats.num_saved_blocks, "loaded_blocks": stats.num_loaded_blocks,
                "evicted_blocks": stats.num_evicted_blocks, "resumes": self.num_resumes,
                "loaded_tokens": self.num_loaded_tokens,
                "recomputed_tokens": self.num_recomputed_tokens}

    def _write_state(self, force: bool = False) -> None:
        """Replace the state file atomically, at most once every STATE_EVERY_S unless `force`."""
        now = time.monotonic()
        if self._state_path is None or (not force and now - self._state_written_at < STATE_EVERY_S):
            return
        self._state_written_at = now
        write_state(self._state_path, self.state())


def checkpointable(request) -> bool:
    """Whether a request's KV is checkpointed (see `Checkpoints`)."""
    return not is_online(request.priority) and not wants_prompt_logprobs(request)


def _scheduled(output):
    """(request id, tokens computed before the step, tokens it computes) of a step."""
    for new in output.scheduled_new_reqs:
        yield new.req_id, new.num_computed_tokens, output.num_scheduled_tokens[new.req_id]
    cached = output.scheduled_cached_reqs
    for req_id, num_before in zip(cached.req_ids, cached.num_computed_tokens):
        yield req_id, num_before, output.num_scheduled_tokens[req_id]


def _work_signature(scheduler_output) -> tuple:
    """The requests of a step and where each starts: a rolled-back step retried has the same."""
    new = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
    cached = scheduler_output.scheduled_cached_reqs
    return tuple(sorted(new + list(zip(cached.req_ids, cached.num_computed_tokens))))
