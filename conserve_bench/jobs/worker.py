"""This process as one worker of a fleet: its row in the store, its heartbeat, its leases.

Every process that claims items (a `serve` replica, `submit`, an lm-eval session) is one
`Worker`: started, it registers a row and renews its lease every `heartbeat_s` on a thread
of its own, whatever the engine is doing; stopped, it gives back what it holds. A worker
that dies simply stops renewing, and the others reclaim its items once the lease expires
(on the database's clock). It decides nothing about jobs and never touches the engine.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

from sqlalchemy.exc import DBAPIError

from conserve_bench.errors import StoreUnavailableError, first_line
from conserve_bench.store import Store

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def new_worker_id() -> str:
    """Unique across hosts and restarts: `host:pid:random` (the pid only helps a person)."""
    return f"{HOST}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """One heartbeat row and the lease on everything its id claims. Example:

        with Worker(store, "submit") as worker:
            Runner(store, engine, owner=worker.id).run(job_id, keys)
    """

    def __init__(self, store: Store, label: str = ""):
        self.store, self.label = store, label
        self.id = new_worker_id()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> "Worker":
        self.store.register_worker(self.id, HOST, os.getpid(), self.label)
        self.store.end_leases(self._dead_neighbours())
        self._thread.start()
        return self

    def _dead_neighbours(self) -> list[str]:
        """Workers registered on this host whose process is gone.

        NOTE: only a shortcut, so that `resume` right after a kill does not wait out the
        lease; across hosts, and whenever a pid was reused, the lease decides. Ending a live
        worker's lease by mistake would cost work, never a result: completion is fenced.
        """
        return [w["id"] for w in self.store.live_workers(host=HOST)
                if w["id"] != self.id and not _pid_alive(w["pid"])]

    def _beat(self) -> None:
        while not self._stopped.wait(self.store.leases.heartbeat_s):
            try:
                self.store.renew_lease(self.id)
            except (StoreUnavailableError, DBAPIError) as e:
                # NOTE: keep beating: once the database is back the lease is renewed, and
                # whatever others reclaimed meanwhile is fenced off from our commits.
                log.warning("heartbeat of %s failed: %s", self.id, first_line(e))

    def stop(self) -> None:
        """Stop beating, give back every item still held, and retire the row."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        self.store.retire_worker(self.id)

    def __enter__(self) -> "Worker":
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
