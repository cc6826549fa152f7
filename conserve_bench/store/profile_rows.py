"""Latency profiles (`profiling.profiles` gives them meaning): one fitted latency model per
profile key, and the latest live refit of each."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from conserve_bench.store.base import StoreBase
from conserve_bench.store.schema import PROFILE_KEY_COLUMNS, profile_refits, profiles


class ProfileRows(StoreBase):
    """The `profiles` and `profile_refits` tables, keyed by PROFILE_KEY_COLUMNS."""

    def save_profile(self, key: Mapping[str, Any], model: dict[str, Any], num_samples: int,
                     fit_error: dict[str, Any] | None = None) -> None:
        """Store a fitted `LatencyModel.to_dict()` under `key` (a value for each of
        PROFILE_KEY_COLUMNS), replacing any profile with the same key."""
        def save(conn: sa.Connection) -> None:
            conn.execute(profiles.delete().where(_profile_key_matches(key)))
            conn.execute(profile_refits.delete().where(_profile_key_matches(key, profile_refits)))
            conn.execute(profiles.insert().values(
                **_profile_key_values(key), model_json=json.dumps(model), num_samples=num_samples,
                fit_error=None if fit_error is None else json.dumps(fit_error),
                created_at=time.time()))

        self._write(save)

    def load_profile(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The profile stored under exactly `key` (every key column equal), or None."""
        rows = self._select_profiles(_profile_key_matches(key))
        return rows[0] if rows else None

    def list_profiles(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every stored profile (of one model), newest first."""
        return self._select_profiles(sa.true() if model is None else profiles.c.model == model)

    def save_refit(self, key: Mapping[str, Any], state: dict[str, Any]) -> None:
        """Store the latest live refit (`RefitStatus.to_dict()`) of the profile under `key`."""
        def save(conn: sa.Connection) -> None:
            conn.execute(profile_refits.delete().where(_profile_key_matches(key, profile_refits)))
            conn.execute(profile_refits.insert().values(
                **_profile_key_values(key), state_json=json.dumps(state), created_at=time.time()))

        self._write(save)

    def load_refit(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The latest live refit stored under exactly `key` (with its `created_at`), or None."""
        row = self._read(lambda conn: conn.execute(sa.select(profile_refits).where(
            _profile_key_matches(key, profile_refits))).mappings().first())
        return None if row is None else {**json.loads(row["state_json"]), "created_at": row["created_at"]}

    def _select_profiles(self, where) -> list[dict[str, Any]]:
        rows = self._read(lambda conn: conn.execute(
            sa.select(profiles).where(where).order_by(profiles.c.created_at.desc())).mappings().all())
        return [_profile_from_row(r) for r in rows]


def _profile_key_values(key: Mapping[str, Any]) -> dict[str, Any]:
    return {name: key[name] for name in PROFILE_KEY_COLUMNS}


def _profile_key_matches(key: Mapping[str, Any], table: sa.Table = profiles):
    return sa.and_(*(table.c[name] == value for name, value in _profile_key_values(key).items()))


def _profile_from_row(r) -> dict[str, Any]:
    return {**{name: r[name] for name in PROFILE_KEY_COLUMNS},
            "latency_model": json.loads(r["model_json"]), "num_samples": r["num_samples"],
            "fit_error": json.loads(r["fit_error"]) if r["fit_error"] else None,
            "created_at": r["created_at"]}
