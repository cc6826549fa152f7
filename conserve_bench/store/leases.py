"""The statements of leased work: claim, complete, fail, give back, renew (SQLAlchemy Core).

One statement per operation, the same text on SQLite and PostgreSQL except where SQLAlchemy
renders a clause only for PostgreSQL (`FOR UPDATE SKIP LOCKED`); `repository.Store` runs
them. An item is pending, running under an owner's lease (`lease_until`, database clock),
done, or failed after `max_attempts` failed attempts; `num_runs` numbers the attempts.
Nothing here opens a connection or reads a clock of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from conserve_bench.store.schema import items, job_items
from conserve_bench.store.states import ItemState

RUNNING, PENDING = ItemState.RUNNING.value, ItemState.PENDING.value


def claim(job_id: str, owner: str, limit: int, kind: str | None, now, lease_s: float,
          max_attempts: int) -> sa.Update:
    """Take up to `limit` of a job's items for `owner`: first those whose lease expired
    (each such loss is a failed attempt: an item out of attempts is failed instead of
    taken), then pending ones in the order they were added. RETURNING the rows it changed.

    NOTE: each candidate set is a MATERIALIZED CTE with `FOR UPDATE SKIP LOCKED`, so it is
    computed once and its rows are locked by this claim alone: concurrent claims skip each
    other's rows instead of waiting, and the LIMIT bounds what the UPDATE touches (inlined
    into the UPDATE, PostgreSQL may re-run the subquery and take more than asked). SQLite
    has no row locks and renders neither clause: there the whole UPDATE holds the single
    writer lock, so no other claim can interleave with it.
    """
    in_job = sa.exists().where(job_items.c.job_id == job_id, job_items.c.item_key == items.c.key)
    where = [in_job] if kind is None else [in_job, items.c.kind == kind]
    # NOTE: never one's own: a replica whose heartbeat could not reach the database still
    # computes what it holds, and renews the lease once the database is back. What it lost
    # track of its next run gives back first (`jobs.runner`), so nothing stays stuck on it.
    expired = _locked(sa.select(items.c.key).where(items.c.state == RUNNING, items.c.lease_until < now,
                                                   items.c.owner != owner, *where)
                      .order_by(items.c.lease_until), limit, "expired")
    pending = _locked(sa.select(items.c.key).where(items.c.state == PENDING, *where)
                      .order_by(items.c.seq), limit, "pending")
    picked = sa.union_all(sa.select(expired.c.key), sa.select(pending.c.key)).limit(limit)
    lost = items.c.state == RUNNING  # as it was before this claim: its holder's lease ran out
    out_of_attempts = sa.and_(lost, items.c.num_failures + 1 >= max_attempts)
    return (
        items.update().where(items.c.key.in_(picked))
        .values(
            state=sa.case((out_of_attempts, ItemState.FAILED.value), else_=RUNNING),
            owner=sa.case((out_of_attempts, items.c.owner), else_=owner),
            num_runs=items.c.num_runs + sa.case((out_of_attempts, 0), else_=1),
            num_failures=items.c.num_failures + sa.case((lost, 1), else_=0),
            error=sa.case((lost, sa.literal("the lease of ") + items.c.owner + " expired"),
                          else_=items.c.error),
            lease_until=sa.case((out_of_attempts, None), else_=now + lease_s),
            claimed_at=now,
        )
        .returning(items.c.key, items.c.kind, items.c.args, items.c.state, items.c.num_runs,
                   items.c.seq)
    )


def _locked(query: sa.Select, limit: int, name: str) -> sa.CTE:
    return (query.limit(limit).with_for_update(skip_locked=True).cte(name)
            .prefix_with("MATERIALIZED"))


def held(owner: str, fenced: bool, key: str = "item_key"):
    """The rows `owner` holds (the key bound as `key`); with `fenced`, only under the attempt
    bound as `attempt`."""
    conditions = [items.c.key == sa.bindparam(key), items.c.owner == owner,
                  items.c.state == RUNNING]
    if fenced:
        conditions.append(items.c.num_runs == sa.bindparam("attempt"))
    return sa.and_(*conditions)


def complete(owner: str, fenced: bool, now) -> sa.Update:
    """Executed with rows {item_key, attempt, item_result}: done, if `owner` still holds it.

    NOTE: the fence. An item whose lease was reclaimed has another owner or a newer attempt,
    so a replica that lost its lease can never overwrite a newer attempt's result.
    """
    return items.update().where(held(owner, fenced)).values(
        state=ItemState.DONE.value, result=sa.bindparam("item_result"), finished_at=now,
        lease_until=None)


def fail(owner: str, fenced: bool, max_attempts: int) -> sa.Update:
    """Executed with rows {item_key, attempt, item_error}: one more failed attempt; back to
    pending, or failed for good once out of attempts. Fenced like `complete`."""
    out_of_attempts = items.c.num_failures + 1 >= max_attempts
    return items.update().where(held(owner, fenced)).values(
        state=sa.case((out_of_attempts, ItemState.FAILED.value), else_=PENDING),
        owner=sa.case((out_of_attempts, items.c.owner), else_=None),
        num_failures=items.c.num_failures + 1, error=sa.bindparam("item_error"), lease_until=None)


def give_back(owner: str, keep: frozenset[str] | None = None) -> sa.Update:
    """Everything `owner` holds (but `keep`) back to pending, no attempt lost (a drain, or
    what a runner lost track of, at the start of its replica's next run)."""
    held = [items.c.owner == owner, items.c.state == RUNNING]
    if keep:
        held.append(items.c.key.not_in(keep))
    return items.update().where(*held).values(state=PENDING, owner=None, lease_until=None)


def renew(owner: str, keys: Sequence[str], now, lease_s: float) -> sa.Update:
    """Push the lease of the items of `keys` that `owner` holds to `lease_s` from now (a
    heartbeat; `keys`: what its runners track, at most `base.SQLITE_MAX_VARS` of them).

    NOTE: only tracked keys, never everything `owner` holds: an item its runner lost track of
    (a commit or a give-back that failed through an outage) must expire, or no claim would
    ever take it back (a claim never takes its owner's own) and its job would wait forever.
    Rows another transaction has locked are skipped, not waited for: they are being
    committed (done, failed, given back) or taken over, and need no lease. A heartbeat that
    waited on its own replica's commit, which locks the same rows in another order, deadlocked.
    """
    mine = (sa.select(items.c.key).where(items.c.owner == owner, items.c.state == RUNNING,
                                         items.c.key.in_(keys))
            .with_for_update(skip_locked=True))
    return items.update().where(items.c.key.in_(mine)).values(lease_until=now + lease_s)


def end_leases(owners: list[str], now) -> sa.Update:
    """Expire now the leases of owners known dead: the next claim reclaims their items."""
    return (items.update().where(items.c.owner.in_(owners), items.c.state == RUNNING)
            .values(lease_until=now - 1.0))
