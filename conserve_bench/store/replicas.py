"""Replicas: one heartbeat row per process that claims items. Its lease, renewed by the
heartbeat, keeps what its runners track of what it holds; a replica that stops or dies gives
its items back. Nothing here decides which items a replica still tracks: its caller says."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa

from conserve_bench.store import leases
from conserve_bench.store.base import StoreBase, chunks
from conserve_bench.store.db import insert_ignore
from conserve_bench.store.schema import workers
from conserve_bench.store.states import ItemState, ReplicaState

OWNED_STATES = (ItemState.DONE, ItemState.RUNNING)  # a replica's share of a job: computed, held


class ReplicaRows(StoreBase):
    """The `workers` table (one row per replica: the table keeps its first name), and which
    replica holds or computed a job's items."""

    @property
    def _live_replica(self):
        return sa.and_(workers.c.state == ReplicaState.ACTIVE, workers.c.lease_until > self._now)

    def register_replica(self, replica_id: str, host: str, pid: int, label: str) -> None:
        now, lease_s = self._now, self.leases.lease_s
        self._write(lambda conn: conn.execute(insert_ignore(workers, conn).values(
            id=replica_id, host=host, pid=pid, label=label, state=ReplicaState.ACTIVE,
            started_at=now, heartbeat_at=now, lease_until=now + lease_s)))

    def renew_lease(self, replica_id: str, keys: Collection[str] = ()) -> int:
        """A heartbeat: the replica's row, and those of `keys` (what its runners track) it
        holds, leased `lease_s` from now; returns how many items it renewed (all of those,
        but the ones being committed). Items it holds beyond `keys` are left to expire."""
        now, lease_s, keys = self._now, self.leases.lease_s, list(keys)

        def renew(conn: sa.Connection) -> int:
            conn.execute(workers.update().where(workers.c.id == replica_id)
                         .values(heartbeat_at=now, lease_until=now + lease_s))
            return sum(conn.execute(leases.renew(replica_id, chunk, now, lease_s)).rowcount
                       for chunk in chunks(keys))

        return self._write(renew)

    def retire_replica(self, replica_id: str) -> None:
        """A replica stops cleanly: its items back to pending, its row no longer live."""
        def retire(conn: sa.Connection) -> None:
            conn.execute(leases.give_back(replica_id))
            conn.execute(workers.update().where(workers.c.id == replica_id).values(
                state=ReplicaState.STOPPED, lease_until=self._now, job_id=None))

        self._write(retire)

    def end_leases(self, replica_ids: Sequence[str]) -> int:
        """Replicas known dead (by their host): their leases end now, so the next claim takes
        their items; returns how many items that frees."""
        if not replica_ids:
            return 0

        def end(conn: sa.Connection) -> int:
            conn.execute(workers.update().where(workers.c.id.in_(replica_ids))
                         .values(lease_until=self._now - 1.0))
            return conn.execute(leases.end_leases(list(replica_ids), self._now)).rowcount

        return self._write(end)

    def live_replicas(self, host: str | None = None) -> list[dict[str, Any]]:
        """Replicas whose lease has not expired (on `host`), oldest first: id, host, pid,
        label, job, started_at, heartbeat age in seconds."""
        now = self._now
        query = (sa.select(workers, (now - workers.c.heartbeat_at).label("heartbeat_age_s"))
                 .where(self._live_replica).order_by(workers.c.started_at))
        if host is not None:
            query = query.where(workers.c.host == host)
        rows = self._read(lambda conn: conn.execute(query).mappings().all())
        return [_replica_from_row(r) for r in rows]

    def _replicas_of(self, conn: sa.Connection, counts: Sequence[tuple[str, str, int]]) -> list[dict[str, Any]]:
        """Per replica that holds or computed any of a job's items (`counts`: its done and
        running items as (owner, state, items)): id, host, label, live, done (items it
        computed), running (items it holds now); most done first."""
        owners = sorted({owner for owner, _, _ in counts})
        rows = {r["id"]: r for r in conn.execute(
            sa.select(workers, self._live_replica.label("live")).where(workers.c.id.in_(owners))
        ).mappings()} if owners else {}
        per_replica: dict[str, dict[str, Any]] = {}
        for owner, state, n in counts:
            row = rows.get(owner)
            entry = per_replica.setdefault(owner, {
                "id": owner, "host": row["host"] if row else None,
                "label": row["label"] if row else None, "live": bool(row and row["live"]),
                "done": 0, "running": 0})
            entry["done" if state == ItemState.DONE else "running"] += n
        return sorted(per_replica.values(), key=lambda w: (-w["done"], w["id"]))


def _replica_from_row(r) -> dict[str, Any]:
    return {"id": r["id"], "host": r["host"], "pid": r["pid"], "label": r["label"],
            "job": r["job_id"], "started_at": r["started_at"],
            "heartbeat_age_s": round(max(0.0, r["heartbeat_age_s"]), 1)}
