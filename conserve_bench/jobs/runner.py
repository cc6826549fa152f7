"""The job runner: feeds a job's pending work items to an engine and commits the results.

Contract: at most `max_inflight` items are claimed and not yet committed at any instant
(in the engine or finished and waiting for the next commit). Finished items are committed
in batches (one transaction per `commit_every` items or per second, whichever comes first),
so a killed process loses at most that window: exactly what `resume` computes again. It
drives any `engine.contract.ItemEngine` and never holds a store transaction while the engine
runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conserve_bench.config import RunConfig
from conserve_bench.engine.contract import ItemEngine
from conserve_bench.store import Store, default_owner

COMMIT_INTERVAL_S = 1.0
WAIT_FOR_OTHERS_S = 0.5


class Stopped(Exception):
    """The runner was asked to stop (e.g. its job was cancelled); its items were kept."""


@dataclass
class RunStats:
    """What one runner did; `store_s` is the bookkeeping share of `wall_s`."""

    num_items: int = 0  # items this runner computed and committed
    wall_s: float = 0.0
    store_s: float = 0.0


class Runner:
    """Computes a job's items on one engine, as one owner of the store's claims."""

    def __init__(self, store: Store, engine: ItemEngine, cfg: RunConfig = RunConfig(),
                 owner: str | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.store = store
        self.engine = engine
        self.cfg = cfg
        self.owner = owner or default_owner()
        self.on_progress = on_progress or (lambda num_done: None)
        self.should_stop = should_stop or (lambda: False)
        self.stats = RunStats()
        self._uncommitted: dict[str, Any] = {}
        self._last_commit = time.monotonic()

    def run(self, job_id: str, keys: list[str], kind: str | None = None) -> dict[str, Any]:
        """Compute every item of `keys` that is not done yet; return all their results.

        Claims only the job's pending items of `kind` (None: of any kind), in job order.
        """
        t0 = time.perf_counter()
        try:
            self._run(job_id, set(keys), kind)
        finally:
            self._commit()
            self.stats.wall_s += time.perf_counter() - t0
        return self._timed(self.store.results_for, keys)

    def _run(self, job_id: str, keys: set[str], kind: str | None) -> None:
        exhausted = False
        while True:
            # NOTE: uncommitted results count against the window, so at most `max_inflight`
            # items are ever claimed and not yet committed: the most a kill can cost.
            room = self.cfg.max_inflight - self.engine.num_pending_items - len(self._uncommitted)
            if not exhausted and room >= max(1, self.cfg.max_inflight // 4):
                claimed = self._timed(self.store.claim_items, job_id, self.owner, room, kind)
                exhausted = len(claimed) < room
                if claimed:
                    self.engine.submit(claimed)
            if self.engine.num_pending_items == 0:
                if exhausted and self._all_done(keys):
                    return
                exhausted = False  # items held by another live owner: wait, then look again
                time.sleep(WAIT_FOR_OTHERS_S)
                continue
            for key, result in self.engine.step():
                self._uncommitted[key] = result
            if (len(self._uncommitted) >= self.cfg.commit_every
                    or time.monotonic() - self._last_commit > COMMIT_INTERVAL_S):
                self._commit()
                if self._timed(self.should_stop):
                    raise Stopped("stopped on request")

    def _all_done(self, keys: set[str]) -> bool:
        self._commit()
        missing = len(keys) - len(self._timed(self.store.results_for, list(keys)))
        if missing:
            self._timed(self.store.requeue_stale)
        return missing == 0

    def _commit(self) -> None:
        self._last_commit = time.monotonic()
        if not self._uncommitted:
            return
        batch, self._uncommitted = self._uncommitted, {}
        # NOTE: an item this owner no longer holds (given back while it was presumed dead)
        # is not committed; its new owner computes it, and `_all_done` waits for that.
        num_committed = self._timed(self.store.complete_items, self.owner, batch)
        self.stats.num_items += num_committed
        self.on_progress(num_committed)

    def release(self) -> int:
        """Give back whatever this runner holds (graceful stop); uncommitted work is lost."""
        self.engine.abort_all()
        self._uncommitted.clear()
        return self.store.release_items(self.owner)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stats.store_s += time.perf_counter() - t0
