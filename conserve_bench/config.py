"""Configuration: frozen dataclasses, validated once at the edge.

The CLI (or a Python caller) builds these from flags and the few environment variables we
honour (`CONSERVE_BENCH_DB`, `CONSERVE_BENCH_DATA`, `CONSERVE_BENCH_HOME`); nothing below
the edge reads the environment. A `JobSpec` is what a job *is*: it is stored with the job
so that `resume` rebuilds exactly the same lm-eval requests.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DB_URL = "sqlite:///conserve.db"
DEFAULT_MODEL = "smollm2-135m"
JOB_SOURCES = ("tasks", "requests")


@dataclass(frozen=True)
class JobSpec:
    """What to evaluate. Two equal specs build identical lm-eval requests.

    `source` is "tasks" (lm-eval builds the requests from `tasks`) or "requests" (an lm-eval
    run elsewhere supplied the work items; `tasks` is only a label and nothing is rebuilt).
    """

    tasks: tuple[str, ...]
    model: str = DEFAULT_MODEL
    limit: int | None = None
    num_fewshot: int | None = None
    data_dir: str | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    source: str = "tasks"

    def __post_init__(self):
        if self.source not in JOB_SOURCES:
            raise ValueError(f"job source must be one of {', '.join(JOB_SOURCES)}")
        if not self.tasks:
            raise ValueError("a job needs at least one task")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError("--num-fewshot must be 0 or more")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": list(self.tasks)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSpec":
        return cls(**{**d, "tasks": tuple(d["tasks"])})


@dataclass(frozen=True)
class EngineConfig:
    """How to start vLLM. `model_path` is a local Hugging Face model directory or hub id."""

    model_path: str
    model_name: str
    dtype: str = "float32"
    max_model_len: int = 2048
    kv_cache_gib: float = 2.0
    seed: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    scheduler_cls: str | None = None  # "module.Class" of a vLLM scheduler subclass
    additional_config: dict[str, Any] = field(default_factory=dict)  # vLLM's plug-in config
    worker_cls: str | None = None  # "module.Class" of a vLLM worker subclass
    kv_transfer_config: dict[str, Any] | None = None  # loads a KV connector (ours: engine.connector)
    async_scheduling: bool | None = None  # None: vLLM decides

    @property
    def fingerprint(self) -> str:
        """What, besides the request itself, decides a result: the model and its numerics.

        NOTE: part of every work item's key; `submit` and `serve` must agree on it, so that a
        job run on either reuses the other's finished items.
        """
        return f"{self.model_name}|{self.dtype}|{self.max_model_len}"


@dataclass(frozen=True)
class RunConfig:
    """How the job runner feeds the engine."""

    max_inflight: int = 64
    commit_every: int | None = None  # default: half the window, so the engine never idles

    def __post_init__(self):
        if self.max_inflight < 1:
            raise ValueError("--max-inflight must be at least 1")
        if self.commit_every is None:
            object.__setattr__(self, "commit_every", max(1, self.max_inflight // 2))


def default_db_url() -> str:
    return os.environ.get("CONSERVE_BENCH_DB", DEFAULT_DB_URL)


def default_data_dir() -> str | None:
    return os.environ.get("CONSERVE_BENCH_DATA") or None


def cache_home() -> Path:
    """Where converted models live: `$CONSERVE_BENCH_HOME` or `~/.cache/conserve-bench`."""
    if home := os.environ.get("CONSERVE_BENCH_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "conserve-bench"
