"""This process as one replica of a fleet: its row in the store, its heartbeat, its leases.

Every process that claims items (a `serve` replica, `submit`, an lm-eval session) is one
`Replica`: started, it registers a row and, every `heartbeat_s` on a thread of its own,
whatever the engine is doing, renews its lease on the items its runners track (`track`);
stopped, it gives back what it holds. A replica that dies simply stops renewing, and the
others reclaim its items once the lease expires (on the database's clock). The heartbeat
survives any error (retrying sooner, never later than a beat) and `health()` says when it has
not renewed for a lease. It decides nothing about jobs and never touches the engine.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Collection
from typing import Protocol

from sqlalchemy.exc import DBAPIError

from conserve_bench.errors import StoreUnavailableError, first_line, one_line_error
from conserve_bench.store import Store

log = logging.getLogger(__name__)

HOST = socket.gethostname()
RETRY_FIRST_S = 0.1  # a failed beat is retried this soon, then twice as late, up to a beat


class Backoff:
    """Capped doubling waits after failures: `next()` is the wait before the next try,
    `reset()` once a try succeeded. The heartbeat and the offline pump retry by it."""

    def __init__(self, first_s: float, max_s: float):
        self.first_s, self.max_s = min(first_s, max_s), max_s
        self._next_s = self.first_s

    def next(self) -> float:
        wait_s, self._next_s = self._next_s, min(2 * self._next_s, self.max_s)
        return wait_s

    def reset(self) -> None:
        self._next_s = self.first_s


def new_replica_id() -> str:
    """Unique across hosts and restarts: `host:pid:random` (the pid only helps a person)."""
    return f"{HOST}:{os.getpid()}:{secrets.token_hex(3)}"


class Holder(Protocol):
    """What a replica leases for (`jobs.runner.Runner`): the keys it claimed and has not yet
    committed or given back. Called on the heartbeat's thread: it must be safe there."""

    def held_keys(self) -> Collection[str]: ...


class Replica:
    """One heartbeat row and the lease on everything its runners track. Example:

        with Replica(store, "submit") as replica:
            Runner(store, engine, replica=replica).run(job_id, keys)

    NOTE: the invariant that keeps no item stuck: an item running under this replica's id is
    renewed only while one of its runners tracks it. One it lost track of (a commit or a
    give-back that failed through an outage) expires and is reclaimed by the others; and,
    since no claim takes its own owner's items, the next run on this replica gives it back
    first (`Runner.run`), even when no other replica is left.
    """

    def __init__(self, store: Store, label: str = ""):
        self.store, self.label = store, label
        self.id = new_replica_id()
        self._holders: weakref.WeakSet = weakref.WeakSet()  # runners leave with their job
        self._lock = threading.Lock()
        self._renewed_at = time.monotonic()  # the last heartbeat that reached the store
        self._last_error: str | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> "Replica":
        self.store.register_replica(self.id, HOST, os.getpid(), self.label)
        self._renewed_at = time.monotonic()
        self.store.end_leases(self._dead_neighbours())
        self._thread.start()
        return self

    def track(self, holder: Holder) -> None:
        """Renew the lease on what `holder` holds, for as long as it lives."""
        with self._lock:
            self._holders.add(holder)

    def held_keys(self) -> frozenset[str]:
        """Every key this replica's runners track: all that is leased to it for a reason."""
        with self._lock:
            holders = list(self._holders)
        return frozenset(key for holder in holders for key in holder.held_keys())

    def _dead_neighbours(self) -> list[str]:
        """Replicas registered on this host whose process is gone.

        NOTE: only a shortcut, so that `resume` right after a kill does not wait out the
        lease; across hosts, and whenever a pid was reused, the lease decides. Ending a live
        replica's lease by mistake would cost work, never a result: completion is fenced.
        """
        return [w["id"] for w in self.store.live_replicas(host=HOST)
                if w["id"] != self.id and not _pid_alive(w["pid"])]

    def _beat(self) -> None:
        heartbeat_s = self.store.leases.heartbeat_s
        backoff, wait_s = Backoff(RETRY_FIRST_S, heartbeat_s), heartbeat_s
        while not self._stopped.wait(wait_s):
            # NOTE: a failed beat is retried sooner, never later than a beat: once the
            # database is back the lease is renewed, and whatever others reclaimed
            # meanwhile is fenced off from our commits.
            if self._renew():
                backoff.reset()
                wait_s = heartbeat_s
            else:
                wait_s = backoff.next()

    def _renew(self) -> bool:
        """One heartbeat; False if it failed (logged, never raised: the thread must live)."""
        try:
            self.store.renew_lease(self.id, self.held_keys())
        except (StoreUnavailableError, DBAPIError) as e:
            log.warning("heartbeat of %s failed: %s", self.id, first_line(e))
            self._last_error = one_line_error(e)
            return False
        except Exception as e:
            log.exception("heartbeat of %s failed", self.id)
            self._last_error = one_line_error(e)
            return False
        self._renewed_at, self._last_error = time.monotonic(), None
        return True

    def health(self) -> tuple[bool, str | None]:
        """(True, None) while the heartbeat renews the lease; else (False, why): stopped, its
        thread died, or no renewal reached the store for a lease (then the store is down, or
        too slow, and the others may take what this replica holds)."""
        if self._stopped.is_set():
            return False, f"replica {self.id} is stopped"
        if self._thread.ident is not None and not self._thread.is_alive():
            return False, f"the heartbeat thread of replica {self.id} died"
        lease_s = self.store.leases.lease_s
        if (age_s := time.monotonic() - self._renewed_at) > lease_s:
            return False, (f"replica {self.id} renewed no lease for {age_s:.1f} s (lease "
                           f"{lease_s:g} s): {self._last_error or 'the store does not answer'}")
        return True, None

    def stop(self) -> None:
        """Stop beating, give back every item still held, and retire the row."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        self.store.retire_replica(self.id)

    def __enter__(self) -> "Replica":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
