"""Partial generations: a running `generate_until` item's tokens so far, saved by the
replica and attempt that hold it (`save_partials`) and handed to its next run
(`resume_partials`), so an interrupted generation continues instead of starting over."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import sqlalchemy as sa

from conserve_bench.store import leases
from conserve_bench.store.base import StoreBase, attempt_param, chunks
from conserve_bench.store.db import insert_ignore
from conserve_bench.store.schema import item_partials, items, job_items
from conserve_bench.store.states import ItemState


class PartialRows(StoreBase):
    """The `item_partials` rows: one per generation ever saved."""

    def save_partials(self, owner: str, partials: Mapping[str, Sequence[int]],
                      attempts: Mapping[str, int] | None = None) -> int:
        """Save the tokens generated so far by running items, by key, in one transaction
        (the runner's batched save); returns how many were saved.

        NOTE: fenced like `complete_items`: only items `owner` holds (under the same attempt,
        when `attempts` is given) are written, so a replica that lost its lease cannot
        overwrite the partial of the attempt that holds the item now.
        """
        if not partials:
            return 0
        now, fenced = time.time(), attempts is not None
        # NOTE: `item_key` names a column of item_partials: bound as "k" in its UPDATE
        held = sa.select(items.c.key).where(leases.held(owner, fenced, key="k"))
        rows = [{"k": key, "t": json.dumps(list(ids)), "n": len(ids),
                 **attempt_param(attempts, key)} for key, ids in partials.items()]

        def save(conn: sa.Connection) -> int:
            for chunk in chunks(list(partials), 500):
                conn.execute(insert_ignore(item_partials, conn), [
                    {"item_key": key, "token_ids": "[]", "num_tokens": 0, "num_resumes": 0,
                     "num_reused_tokens": 0, "updated_at": now} for key in chunk])
            return conn.execute(
                item_partials.update()
                .where(item_partials.c.item_key == sa.bindparam("k"),
                       item_partials.c.item_key.in_(held))
                .values(token_ids=sa.bindparam("t"), num_tokens=sa.bindparam("n"), updated_at=now),
                rows).rowcount

        return self._write(save)

    def resume_partials(self, keys: Sequence[str]) -> dict[str, list[int]]:
        """The saved tokens of items just claimed, by key (those that have any); each
        counts as a resume of its item. One transaction."""
        now = time.time()

        def resume(conn: sa.Connection) -> dict[str, list[int]]:
            out: dict[str, list[int]] = {}
            for chunk in chunks(list(keys)):
                found = (item_partials.c.item_key.in_(chunk), item_partials.c.num_tokens > 0)
                # NOTE: the write comes first, so SQLite takes its write lock before reading.
                conn.execute(item_partials.update().where(*found).values(
                    num_resumes=item_partials.c.num_resumes + 1, updated_at=now,
                    num_reused_tokens=item_partials.c.num_reused_tokens + item_partials.c.num_tokens))
                rows = conn.execute(sa.select(item_partials.c.item_key, item_partials.c.token_ids)
                                    .where(*found)).all()
                out.update({r.item_key: json.loads(r.token_ids) for r in rows})
            return out

        return self._write(resume)

    def clear_partials(self, keys: Sequence[str]) -> None:
        """Drop the saved tokens of items that are done (their resume counts stay)."""
        done = sa.select(items.c.key).where(items.c.state == ItemState.DONE)

        def clear(conn: sa.Connection) -> None:
            for chunk in chunks(list(keys)):
                conn.execute(item_partials.update()
                             .where(item_partials.c.item_key.in_(chunk),
                                    item_partials.c.item_key.in_(done))
                             .values(token_ids="[]", num_tokens=0, updated_at=time.time()))

        self._write(clear)

    def partials(self, job_id: str) -> dict[str, list[int]]:
        """The saved tokens of a job's unfinished items, by key."""
        rows = self._read(lambda conn: conn.execute(
            sa.select(item_partials.c.item_key, item_partials.c.token_ids)
            .join(job_items, job_items.c.item_key == item_partials.c.item_key)
            .join(items, items.c.key == item_partials.c.item_key)
            .where(job_items.c.job_id == job_id, items.c.state != ItemState.DONE,
                   item_partials.c.num_tokens > 0)).all())
        return {r.item_key: json.loads(r.token_ids) for r in rows}

    def resumes(self, job_id: str) -> dict[str, dict[str, int]]:
        """Per item of a job that continued a partial: `num_resumes`, `num_reused_tokens`."""
        rows = self._read(lambda conn: conn.execute(
            sa.select(item_partials.c.item_key, item_partials.c.num_resumes,
                      item_partials.c.num_reused_tokens)
            .join(job_items, job_items.c.item_key == item_partials.c.item_key)
            .where(job_items.c.job_id == job_id, item_partials.c.num_resumes > 0)).all())
        return {r.item_key: {"num_resumes": r.num_resumes, "num_reused_tokens": r.num_reused_tokens}
                for r in rows}
