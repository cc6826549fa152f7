"""The job runner: feeds a job's pending work items to an engine and commits the results.

Contract: at most `max_inflight` items are claimed and not yet committed at any instant
(in the engine or finished and waiting for the next commit). Finished items are committed
in batches (one transaction per `commit_every` items or per second, whichever comes first),
so a killed process loses at most that window: exactly what another replica, or `resume`,
computes again. Each commit is fenced by the attempt each item was claimed under. Any
number of runners, in any number of processes, may run the same job: they share its items
through the store's claims. Inside that window, the tokens so far of generations in flight
are saved as partials (every `partial_tokens` tokens or `partial_s` seconds, all in one
transaction, fenced like commits), and a claimed generation continues from its partial: a
kill costs a generation at most the tokens since. It drives any
`engine.contract.ItemEngine` and never holds a store transaction while the engine runs.
Run as a `jobs.replica.Replica`'s, it is tracked by it: the heartbeat renews exactly the items
it holds, and each run starts by giving back what its replica holds but no runner tracks (left
over from a commit or a give-back that failed through a store outage).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conserve_bench.config import RunConfig
from conserve_bench.engine.contract import ItemEngine, ItemError
from conserve_bench.errors import ItemsFailedError
from conserve_bench.jobs.heap import frozen_heap
from conserve_bench.jobs.replica import Replica, new_replica_id
from conserve_bench.store import Store

COMMIT_INTERVAL_S = 1.0
WAIT_FOR_OTHERS_S = 0.5
# NOTE: a save of partials waits at least 1 / MAX_PARTIALS_SHARE times as long as the previous
# one took, so saving never takes more than this share of the wall time, however slow the store.
MAX_PARTIALS_SHARE = 0.005
# the kinds of item whose generation continues from a partial (an OpenAI batch line: when
# its engine can continue it, `engine.openai_requests.can_continue`)
RESUMABLE_KINDS = ("generate_until", "openai")


class Stopped(Exception):
    """The runner was asked to stop (e.g. its job was cancelled); its items were kept."""


@dataclass
class RunStats:
    """What one runner did; `store_s` (partial saves included) is the bookkeeping share of
    `wall_s`."""

    num_items: int = 0  # items this runner computed and committed
    num_failed: int = 0  # failed attempts it recorded (results: `num_failed_attempts`)
    num_generated_tokens: int = 0  # tokens its engine generated for them (not those continued from)
    num_partial_saves: int = 0
    wall_s: float = 0.0
    store_s: float = 0.0
    partials_s: float = 0.0


class Runner:
    """Computes a job's items on one engine, as one owner of the store's claims.

    `replica`: this process's `jobs.replica.Replica`, whose id owns the claims and whose
    heartbeat keeps leased what this runner holds. Without one, `owner` is the claims' owner
    (None: a fresh id), and they simply last one lease.
    """

    def __init__(self, store: Store, engine: ItemEngine, cfg: RunConfig = RunConfig(),
                 owner: str | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_tokens: Callable[[int], None] | None = None,
                 replica: Replica | None = None):
        if replica is not None and owner not in (None, replica.id):
            raise ValueError(f"owner {owner!r} is not replica {replica.id!r}")
        self.store = store
        self.engine = engine
        self.cfg = cfg
        self.replica = replica
        self.owner = replica.id if replica is not None else owner or new_replica_id()
        self.on_progress = on_progress or (lambda num_done: None)
        self.should_stop = should_stop or (lambda: False)
        self.on_tokens = on_tokens or (lambda num_tokens: None)
        self.stats = RunStats()
        self._attempts: dict[str, int] = {}  # claimed, not yet committed: key -> attempt
        self._uncommitted: dict[str, Any] = {}
        self._failed: dict[str, str] = {}  # key -> the engine's error
        self._last_commit = time.monotonic()
        self._saved: dict[str, int] = {}  # generation in flight -> tokens its partial holds
        self._to_clear: set[str] = set()  # finished items whose partial goes once committed
        self._num_tokens_seen = self._num_tokens_at_save = engine.num_generated_tokens
        self._last_save = time.monotonic()
        self._min_save_interval_s = 0.0
        if replica is not None:
            replica.track(self)

    def held_keys(self) -> list[str]:
        """The keys this runner claimed and has not yet committed or given back: what its
        replica's heartbeat renews. NOTE: called on the heartbeat's thread; `dict.copy` is
        one step under the GIL, so it never sees the dict change size mid-copy."""
        return list(self._attempts.copy())

    def _kept(self) -> frozenset[str]:
        """What this owner holds and knows of: what its replica's runners track (this one's
        without a replica). Whatever else it holds, nobody computes."""
        return self.replica.held_keys() if self.replica is not None else frozenset(self._attempts)

    def run(self, job_id: str, keys: list[str], kind: str | None = None) -> dict[str, Any]:
        """Compute every item of `keys` that is not done yet; return all their results.

        Claims only the job's pending items of `kind` (None: of any kind), in job order.
        Raises `ItemsFailedError` when nothing is left to compute but some items failed.
        """
        t0 = time.perf_counter()
        try:
            # NOTE: a claim never takes its owner's own items, and the heartbeat renews only
            # tracked ones: without this, an item a failed release left running under this
            # replica would wait for the others to reclaim it, for ever if there are none.
            self._timed(self.store.release_items, self.owner, self._kept())
            with frozen_heap():  # NOTE: the job's lm-eval requests, out of the collector's walks
                self._run(job_id, kind)
        finally:
            self._commit()
            self.stats.wall_s += time.perf_counter() - t0
        return self._timed(self.store.results_for, keys)

    def _run(self, job_id: str, kind: str | None) -> None:
        exhausted = False
        while True:
            # NOTE: uncommitted results count against the window, so at most `max_inflight`
            # items are ever claimed and not yet committed: the most a kill can cost.
            room = self.cfg.max_inflight - len(self._attempts)
            if not exhausted and room >= max(1, self.cfg.max_inflight // 4):
                exhausted = len(self._claim(job_id, room, kind)) < room
            if self.engine.num_pending_items == 0:
                if exhausted and self._finished(job_id, kind):
                    return
                exhausted = False  # items held by other live replicas: wait, then look again
                time.sleep(WAIT_FOR_OTHERS_S)
                continue
            self._step()
            if (len(self._uncommitted) + len(self._failed) >= self.cfg.commit_every
                    or time.monotonic() - self._last_commit > COMMIT_INTERVAL_S):
                self._commit()
                if self._timed(self.should_stop):
                    raise Stopped("stopped on request")

    def _claim(self, job_id: str, room: int, kind: str | None) -> list:
        claimed = self._timed(self.store.claim_items, job_id, self.owner, room, kind,
                              self._kept())
        self._attempts.update((w.key, w.attempt) for w in claimed)
        if claimed:
            self._submit(claimed)
        return claimed

    def _submit(self, claimed: list) -> None:
        """Hand claimed items to the engine; generations continue from their partials."""
        keys = [w.key for w in claimed if w.kind in RESUMABLE_KINDS]
        partials = {}
        if keys and self.cfg.partial_tokens:
            partials = self._timed(self.store.resume_partials, keys)
            self._saved.update({key: len(partials.get(key, ())) for key in keys})
        self.engine.submit(claimed, partials)

    def _step(self) -> None:
        for key, result in self.engine.step():
            if isinstance(result, ItemError):
                self._failed[key] = result.message
                self._saved.pop(key, None)
                continue
            self._uncommitted[key] = result
            if self._saved.pop(key, 0):
                self._to_clear.add(key)
        num_tokens = self.engine.num_generated_tokens - self._num_tokens_seen
        if num_tokens:
            self._num_tokens_seen += num_tokens
            self.stats.num_generated_tokens += num_tokens
            self.on_tokens(num_tokens)
        if self._partials_due():
            self._save_partials()

    def _partials_due(self) -> bool:
        """Due once the generations in flight have `partial_tokens` new tokens each (on
        average), or `partial_s` passed, but never sooner than the share bound allows."""
        since_s = time.monotonic() - self._last_save
        num_new = self._num_tokens_seen - self._num_tokens_at_save
        if not self._saved or not num_new or since_s < self._min_save_interval_s:
            return False
        return (num_new >= self.cfg.partial_tokens * len(self._saved)
                or since_s >= self.cfg.partial_s)

    def _save_partials(self) -> None:
        """Store the new tokens of every generation in flight, in one transaction."""
        t0 = time.perf_counter()
        partials = {key: token_ids for key, token_ids in self.engine.partials().items()
                    if len(token_ids) > self._saved.get(key, len(token_ids))
                    and key in self._attempts}
        if partials:
            self._timed(self.store.save_partials, self.owner, partials,
                        {key: self._attempts[key] for key in partials})
            self._saved.update({key: len(token_ids) for key, token_ids in partials.items()})
            self.stats.num_partial_saves += 1
        took_s = time.perf_counter() - t0
        self.stats.partials_s += took_s
        self._min_save_interval_s = took_s / MAX_PARTIALS_SHARE
        self._last_save = time.monotonic()
        self._num_tokens_at_save = self._num_tokens_seen

    def _finished(self, job_id: str, kind: str | None) -> bool:
        """Nothing of the job (of `kind`) is pending or leased; raises if any item failed."""
        self._commit()
        if self._timed(self.store.num_unfinished, job_id, kind):
            return False
        if errors := self._timed(self.store.item_errors, job_id, kind, None):
            first = errors[0]
            raise ItemsFailedError(
                f"{len(errors)} item(s) failed {first['attempts']} attempt(s); first, "
                f"{first['kind']} {first['key'][:12]}: {first['error']}")
        return True

    def _commit(self) -> None:
        self._last_commit = time.monotonic()
        if not self._uncommitted and not self._failed:
            return
        done, self._uncommitted = self._uncommitted, {}
        failed, self._failed = self._failed, {}
        attempts = {key: self._attempts.pop(key) for key in (*done, *failed)}
        # NOTE: an item this owner no longer holds (its lease expired and another replica
        # took it) is not committed; its new owner computes it, and `_finished` waits.
        num_committed = self._timed(self.store.complete_items, self.owner, done, attempts)
        self.stats.num_failed += self._timed(self.store.fail_items, self.owner, failed, attempts)
        if cleared := self._to_clear & set(done):
            self._timed(self.store.clear_partials, list(cleared))
            self._to_clear -= cleared
        self.stats.num_items += num_committed
        self.on_progress(num_committed)

    def release(self) -> int:
        """Give back whatever this runner holds (graceful stop). Generations in flight have
        their partials saved first, so they continue where they were; other uncommitted work is lost."""
        if self._saved:
            self._save_partials()  # NOTE: before abort_all drops their tokens
        self.engine.abort_all()
        self._uncommitted.clear()
        self._failed.clear()
        self._attempts.clear()
        self._saved.clear()
        self._to_clear.clear()
        return self.store.release_items(self.owner, self._kept())

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stats.store_s += time.perf_counter() - t0
