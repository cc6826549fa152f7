"""The KV checkpoint book: which KV blocks of which offline request are held on the host.

`CheckpointBook` owns the host pool's slots (one slot holds one KV block of every layer), each
offline request's checkpoint (the slots of its first blocks, in token order: always a
prefix), the eviction policy, and what each step copies (saves of newly committed full
blocks, loads on resume). Plain data: it must never import torch or vLLM, and never decide
by the clock; the connector's scheduler half (`vllm_plugin.connector_scheduler`) feeds it
vLLM's state, and its worker half moves the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Save:
    """Copy device block `block_id` (block `index` of `req_id`) to host slot `slot`."""

    req_id: str
    index: int
    block_id: int
    slot: int


@dataclass(frozen=True)
class Load:
    """Copy host slot `slot` to device block `block_id`."""

    slot: int
    block_id: int


@dataclass(frozen=True)
class Resume:
    """A preempted request scheduled again: tokens it had computed before, and how many of
    those are loaded from its checkpoint, found in vLLM's prefix cache, or computed again."""

    req_id: str
    num_progress: int
    num_loaded: int
    num_local: int

    @property
    def num_recomputed(self) -> int:
        return max(0, self.num_progress - self.num_loaded - self.num_local)


@dataclass
class _Checkpoint:
    arrival: float  # the request's arrival time: vLLM preempts the latest-arrived first
    slots: list[int] = field(default_factory=list)  # slots[i] holds block i
    preempted: bool = False
    num_progress: int = 0  # tokens whose KV was computed, as of the last finished step

    def rank(self) -> tuple[int, float]:
        """Lower ranks are evicted first (see `CheckpointBook`)."""
        return (1, -self.arrival) if self.preempted else (0, self.arrival)


@dataclass(frozen=True)
class BookStats:
    num_slots: int  # the pool's capacity, in blocks
    num_used: int
    num_requests: int
    num_saved_blocks: int  # totals since start
    num_loaded_blocks: int
    num_evicted_blocks: int


class CheckpointBook:
    """The host pool's slots and every offline request's checkpoint.

    Eviction keeps the checkpoints most likely to be resumed. A preempted request will be
    resumed for sure and its checkpoint is its only copy, so it outranks every running
    request's (insurance against a preemption that may never come). Running requests are
    preempted latest-arrived first (vLLM's priority preemption and
    `ConserveScheduler._make_room_for_online` alike), so the earliest-arrived one's
    checkpoint goes first; preempted ones resume earliest-arrived first, so the latest-arrived
    one's goes first. A save may only evict checkpoints ranked below its own request's, so two
    requests never evict each other in turn. Eviction takes blocks off the end of a
    checkpoint: what is left is still a valid prefix.

    One step at a time: `plan_saves` reserves slots for a step, `finish_step` commits them
    (the step ran to the end) or returns them (it was abandoned: its KV is half written).
    """

    def __init__(self, num_slots: int, block_size: int):
        if num_slots < 0 or block_size < 1:
            raise ValueError(f"bad pool: {num_slots} slots of {block_size} tokens")
        self.num_slots, self.block_size = num_slots, block_size
        self._capacity = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._checkpoints: dict[str, _Checkpoint] = {}
        self._pending: tuple[Save, ...] | None = None
        self._num_saved = self._num_loaded = self._num_evicted = 0

    # -- requests --------------------------------------------------------------------------

    def track(self, req_id: str, arrival: float) -> None:
        """Start keeping `req_id`'s progress (an offline request, first scheduled)."""
        self._checkpoints.setdefault(req_id, _Checkpoint(arrival))

    def is_tracked(self, req_id: str) -> bool:
        return req_id in self._checkpoints

    def release(self, req_id: str) -> None:
        """`req_id` finished or was aborted: its slots go back to the pool."""
        checkpoint = self._checkpoints.pop(req_id, None)
        if checkpoint is not None:
            self._free.extend(reversed(checkpoint.slots))

    def mark_preempted(self, req_ids: Iterable[str]) -> list[str]:
        """Note preempted requests; returns those that hold a checkpoint (to flush)."""
        flushed = []
        for req_id in req_ids:
            checkpoint = self._checkpoints.get(req_id)
            if checkpoint is not None:
                checkpoint.preempted = True
                if checkpoint.slots:
                    flushed.append(req_id)
        return flushed

    def num_checkpointed_tokens(self, req_id: str) -> int:
        checkpoint = self._checkpoints.get(req_id)
        return len(checkpoint.slots) * self.block_size if checkpoint is not None else 0

    def num_matched_tokens(self, req_id: str, num_tokens: int, num_local: int) -> int:
        """Tokens past vLLM's own prefix-cache hit (`num_local`, block-aligned) that
        `req_id`'s checkpoint can supply, of a request now `num_tokens` long.

        NOTE: at least one token is always left to compute (vLLM must sample the next one).
        """
        usable = min(self.num_checkpointed_tokens(req_id), (num_tokens - 1) // self.block_size * self.block_size)
        return max(0, usable - num_local)

    def plan_load(self, req_id: str, num_local: int, num_loaded: int,
                  block_ids: list[int]) -> tuple[tuple[Load, ...], Resume]:
        """The copies that bring tokens [num_local, num_local + num_loaded) of `req_id` back
        into its device blocks `block_ids`, and what the resume saves."""
        checkpoint = self._checkpoints[req_id]
        first, last = num_local // self.block_size, (num_local + num_loaded) // self.block_size
        loads = tuple(Load(checkpoint.slots[i], block_ids[i]) for i in range(first, last))
        self._num_loaded += len(loads)
        checkpoint.preempted = False
        return loads, Resume(req_id, checkpoint.num_progress, num_loaded, num_local)

    def resumed_without_load(self, req_id: str, num_local: int) -> Resume | None:
        """A tracked request scheduled again with nothing loaded; None if it never ran."""
        checkpoint = self._checkpoints.get(req_id)
        if checkpoint is None or not checkpoint.num_progress:
            return None
        checkpoint.preempted = False
        return Resume(req_id, checkpoint.num_progress, 0, num_local)

    # -- steps -----------------------------------------------------------------------------

    def plan_saves(self, committed: Iterable[tuple[str, int, list[int]]]) -> tuple[Save, ...]:
        """Saves for one step: for each (request, tokens computed once the step ends, its
        device blocks), the full blocks past its checkpoint. A block that finds no slot (the
        pool is full of checkpoints ranked above the request's) is not saved, nor any after
        it; the next step tries again while the request still runs."""
        if self._pending is not None:
            raise RuntimeError("plan_saves before the previous step finished")
        saves: list[Save] = []
        for req_id, num_committed, block_ids in committed:
            checkpoint = self._checkpoints.get(req_id)
            if checkpoint is None:
                continue
            for index in range(len(checkpoint.slots), num_committed // self.block_size):
                slot = self._take_slot(req_id)
                if slot is None:
                    break
                saves.append(Save(req_id, index, block_ids[index], slot))
        self._pending = tuple(saves)
        return self._pending

    def finish_step(self, ran: bool, progress: Iterable[tuple[str, int]] = ()) -> None:
        """The planned step came back: commit its saves and each request's progress (tokens
        computed) if it `ran` to the end; else return its slots."""
        pending, self._pending = self._pending or (), None
        for save in pending:
            checkpoint = self._checkpoints.get(save.req_id)
            # NOTE: a request may have finished or been aborted since the plan (its slots
            # were released then); a slot is only ever appended right after its predecessor.
            if ran and checkpoint is not None and save.index == len(checkpoint.slots):
                checkpoint.slots.append(save.slot)
                self._num_saved += 1
            else:
                self._free.append(save.slot)
        if ran:
            for req_id, num_computed in progress:
                if (checkpoint := self._checkpoints.get(req_id)) is not None:
                    checkpoint.num_progress = num_computed

    def set_capacity(self, num_slots: int) -> None:
        """Use at most `num_slots` of the pool (<= its size), evicting down to it now."""
        self._capacity = max(0, min(num_slots, self.num_slots))
        excess = self.num_used - self._capacity
        while excess > 0:
            holders = [c for c in self._checkpoints.values() if c.slots]
            if not holders:
                return  # NOTE: the rest is reserved by the step in flight; freed when it ends
            excess -= self._evict(min(holders, key=_Checkpoint.rank), excess)

    # -- slots -----------------------------------------------------------------------------

    @property
    def num_used(self) -> int:
        """Slots holding a checkpoint's block or reserved for this step's saves."""
        return self.num_slots - len(self._free)

    def stats(self) -> BookStats:
        return BookStats(self._capacity, self.num_used, len(self._checkpoints), self._num_saved,
                         self._num_loaded, self._num_evicted)

    def _take_slot(self, req_id: str) -> int | None:
        if self.num_used >= self._capacity:
            rank = self._checkpoints[req_id].rank()
            victims = [c for r, c in self._checkpoints.items()
                       if r != req_id and c.slots and c.rank() < rank]
            if not victims:
                return None
            self._evict(min(victims, key=_Checkpoint.rank), 1)
        return self._free.pop()

    def _evict(self, victim: _Checkpoint, num_blocks: int) -> int:
        """Take up to `num_blocks` off the end of `victim`'s checkpoint; returns how many."""
        taken = victim.slots[len(victim.slots) - min(num_blocks, len(victim.slots)):]
        del victim.slots[len(victim.slots) - len(taken):]
        self._free.extend(reversed(taken))
        self._num_evicted += len(taken)
        return len(taken)


def pool_slots(gib: float, block_bytes: int) -> int:
    """How many blocks of `block_bytes` (every layer's K and V) a pool of `gib` GiB holds."""
    if block_bytes < 1:
        raise ValueError("a KV block takes at least one byte")
    return int(gib * 2**30) // block_bytes
