"""Configuration: frozen dataclasses, validated once at the edge.

The CLI (or a Python caller) builds these from flags and the environment variables read
here (`CONSERVE_BENCH_DB`, `CONSERVE_BENCH_DATA`, `CONSERVE_BENCH_HOME`, `XDG_CACHE_HOME`;
the CLI reads `CONSERVE_BENCH_API_KEY`). Below the edge only the vLLM glue reads the
environment, for what vLLM itself takes from it (`engine.local`: `VLLM_CPU_*`,
`CONSERVE_BENCH_ENFORCE_EAGER`). A `JobSpec` is what a job *is*: it is stored with the job
so that `resume` rebuilds exactly the same lm-eval requests, on the same engine (its
`ModelOptions`). The engine fingerprint (`EngineConfig.fingerprint`) is written and read only here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

DEFAULT_DB_URL = "sqlite:///conserve.db"
DEFAULT_MODEL = "smollm2-135m"
JOB_SOURCES = ("tasks", "requests", "session", "batch")
# vLLM's `--dtype` values, each spelled one way (a fingerprint names the dtype)
DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "bfloat16": "bfloat16",
          "float16": "float16", "half": "float16"}
# NOTE: vLLM's own `auto` on its CPU build downcasts a float32 model to bfloat16
# (`vllm.config.model._resolve_auto_dtype`). Ours stays at float32 there, the dtype every
# score of this project was measured in, so a default run keeps its scores.
CPU_AUTO_DTYPE = "float32"


class ServePolicy(str, Enum):
    """How `serve` (`--policy`) and `bench` (`--policies`) share one engine between online
    traffic and offline jobs. The values are the command-line strings."""

    CONSERVE = "conserve"  # ConserveScheduler: offline work sized by the latency model
    PRIORITY = "priority"  # vLLM's priority scheduling alone: online first, offline behind
    ONLINE_ONLY = "online-only"  # no offline work (the baseline)

    def __str__(self) -> str:
        return self.value  # NOTE: the CLI string in messages and f-strings, on every Python

    @classmethod
    def names(cls) -> str:
        """The policies as a command line spells them: `conserve, priority, online-only`."""
        return ", ".join(p.value for p in cls)


@dataclass(frozen=True)
class ModelOptions:
    """How the model is loaded: lm-eval `vllm` backend's model_args, under its names.

    `dtype` "auto" is the model's own dtype (float32 on vLLM's CPU build: `engine_dtype`);
    `max_model_len` None is the model's own context, capped only by the KV cache;
    `gpu_memory_utilization` None is vLLM's default; `revision` a hub revision (branch, tag or
    commit); `add_bos_token` prefixes every encoded text with the BOS token, as lm-eval's
    `vllm` does; `seed` is the engine's sampling seed. `deterministic` (ours, not lm-eval's)
    asks for the strongest determinism the platform offers: vLLM's batch-invariant mode where
    vLLM has it (CUDA, ROCm, XPU), else, on `serve`, offline requests batched apart from
    online ones (docs/scoring.md).
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    revision: str | None = None
    trust_remote_code: bool = False
    add_bos_token: bool = False
    seed: int = 0
    deterministic: bool = False

    def __post_init__(self):
        if not isinstance(self.dtype, str) or self.dtype.lower() not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", DTYPES[self.dtype.lower()])
        self._check_numbers()
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision.strip()):
            raise ValueError(f"--revision must be a branch, tag or commit, got {self.revision!r}")
        for name in ("trust_remote_code", "add_bos_token", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"--{_flag(name)} must be true or false, got {getattr(self, name)!r}")

    def _check_numbers(self) -> None:
        for name, low in (("max_model_len", 1), ("tensor_parallel_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if not (value is None and name == "max_model_len") and not _whole(value, low):
                raise ValueError(f"--{_flag(name)} must be a whole number >= {low}, got {value!r}")
        memory = self.gpu_memory_utilization
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                                   or not 0 < memory <= 1):
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {memory!r}")

    def engine_dtype(self, on_cpu: bool) -> str:
        """The dtype vLLM is asked for: `auto` is CPU_AUTO_DTYPE on the CPU build."""
        return CPU_AUTO_DTYPE if self.dtype == "auto" and on_cpu else self.dtype

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ModelOptions":
        """Options from a dict (a stored spec's, a CI file's); unknown keys are a ValueError."""
        names = [f.name for f in fields(cls)]
        if unknown := sorted(set(d or {}) - set(names)):
            raise ValueError(f"unknown model option {unknown[0]!r} (expected one of {', '.join(names)})")
        return cls(**(d or {}))


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class JobSpec:
    """What to evaluate. Two equal specs build identical lm-eval requests.

    `source` is "tasks" (lm-eval builds the requests from `tasks`), "requests" (an lm-eval
    run elsewhere supplied the work items; `tasks` is only a label and nothing is rebuilt) or
    "session" (an lm-eval run in another process adds its items as it goes and runs them
    itself). Requests and sessions name the engine `fingerprint` their item keys were built
    with: only an engine of that fingerprint may compute them.
    `samples` fixes the documents of some tasks (task -> doc indices, sorted), in place of
    `limit`; tasks it does not name run all their documents.
    Chat (lm-eval's options, its names): `apply_chat_template` renders each context with the
    model's chat template (True: the tokenizer's own; a string names one of several),
    `fewshot_as_multiturn` gives few-shot examples as turns (None: lm-eval's default, on with
    a template), `system_instruction` opens the chat. `chat_template_sha256` records the
    template that rendered a requests job's contexts.
    """

    tasks: tuple[str, ...]
    model: str = DEFAULT_MODEL
    limit: int | None = None
    num_fewshot: int | None = None
    data_dir: str | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    source: str = "tasks"
    samples: dict[str, list[int]] | None = None
    fingerprint: str | None = None
    model_options: ModelOptions = ModelOptions()  # the engine `resume` starts for it
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None
    chat_template_sha256: str | None = None

    def __post_init__(self):
        if isinstance(self.model_options, dict):  # NOTE: as stored (`to_dict`); older specs have none
            object.__setattr__(self, "model_options", ModelOptions.from_dict(self.model_options))
        if self.source not in JOB_SOURCES:
            raise ValueError(f"job source must be one of {', '.join(JOB_SOURCES)}")
        if not self.tasks:
            raise ValueError("a job needs at least one task")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError("--num-fewshot must be 0 or more")
        if self.samples is not None:
            self._check_samples()
        self._check_chat()

    def _check_chat(self) -> None:
        # NOTE: as lm-eval's own CLI: multi-turn few-shot examples need a template to turn.
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("--fewshot-as-multiturn needs --apply-chat-template")
        if self.apply_chat_template == "":
            raise ValueError("--apply-chat-template names a template, or is given alone")

    def _check_samples(self) -> None:
        if self.limit is not None:
            raise ValueError("a job takes a limit or fixed samples, not both")
        for task, indices in self.samples.items():
            # NOTE: lm-eval maps the k-th selected document to indices[k], which is its
            # index only when the indices are sorted.
            if not indices or any(i < 0 for i in indices) or list(indices) != sorted(set(indices)):
                raise ValueError(f"samples of {task}: doc indices must be distinct, sorted, >= 0")

    def to_dict(self) -> dict[str, Any]:
        # NOTE: chat fields at their defaults are left out, so a spec without chat is stored
        # (and digested into a CI job's run key, `ci.suite.job_run_key`) as before them.
        chat = {name: value for name, value in CHAT_DEFAULTS.items() if getattr(self, name) == value}
        return {k: v for k, v in {**asdict(self), "tasks": list(self.tasks)}.items() if k not in chat}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobSpec":
        return cls(**{**d, "tasks": tuple(d["tasks"])})


CHAT_DEFAULTS = {"apply_chat_template": False, "fewshot_as_multiturn": None,
                 "system_instruction": None, "chat_template_sha256": None}


@dataclass(frozen=True)
class EngineConfig:
    """How to start vLLM. `model_path` is a local Hugging Face model directory or hub id."""

    model_path: str
    model_name: str
    dtype: str = "float32"
    # None: the model's own context length, capped only by what the KV cache can hold
    max_model_len: int | None = None
    kv_cache_gib: float = 2.0
    seed: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    enforce_eager: bool | None = None  # None: the platform's default (see engine_args)
    scheduler_cls: str | None = None  # "module.Class" of a vLLM scheduler subclass
    additional_config: dict[str, Any] = field(default_factory=dict)  # vLLM's plug-in config
    worker_cls: str | None = None  # "module.Class" of a vLLM worker subclass
    kv_transfer_config: dict[str, Any] | None = None  # loads a KV connector (ours: vllm_plugin.connector)
    async_scheduling: bool | None = None  # None: vLLM decides
    num_gpu_blocks: int | None = None  # None: as many KV blocks as kv_cache_gib holds
    enable_prefix_caching: bool | None = None  # None: vLLM's default (on)
    scheduling_policy: str | None = None  # None: vLLM's default ("fcfs"); the ConServe policy needs "priority"
    # None: in this process on the CPU build, unless a worker subclass or KV connector is
    # loaded or another engine core runs here (see engine.local.engine_core_placement);
    # False: vLLM's engine-core process, as `serve`
    engine_core_in_process: bool | None = None
    revision: str | None = None  # a hub model's revision; None: its default branch
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: vLLM's default
    add_bos_token: bool = False  # the encoder prefixes texts with BOS (`prompts.Encoder`)
    batch_invariant: bool = False  # vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1)

    @classmethod
    def for_model(cls, model_path: str, model_name: str, options: ModelOptions, on_cpu: bool,
                  **overrides: Any) -> "EngineConfig":
        """The engine `options` describe (`dtype` resolved for the platform: `on_cpu`), with
        other `EngineConfig` fields `overrides` (which win)."""
        given = {name: getattr(options, name) for name in (
            "max_model_len", "seed", "revision", "trust_remote_code", "tensor_parallel_size",
            "gpu_memory_utilization", "add_bos_token")}
        # NOTE: vLLM's batch-invariant kernels are Triton's and cuBLAS's: none on its CPU build
        batch_invariant = options.deterministic and not on_cpu
        return cls(model_path=model_path, model_name=model_name,
                   **{**given, "dtype": options.engine_dtype(on_cpu),
                      "batch_invariant": batch_invariant, **overrides})

    def fingerprint(self, max_model_len: int, weights: str, runtime: str,
                    dtype: str | None = None) -> str:
        """What, besides the request itself, decides a result, readably: the model's name,
        the dtype it runs in (`dtype`, as the started engine reports it; else ours), the
        context length the engine really runs with (where long contexts are truncated), the
        weights' identity (`engine.models.weights_identity`), vLLM's version and device
        (`runtime`, e.g. `0.32.0+cpu`) and, when on, the BOS prefix (`|bos`) and vLLM's
        batch-invariant kernels (`|batch-invariant`, other numerics):
        `smollm2-135m|float32|8192|w=1a2b3c4d5e6f|vllm=0.32.0+cpu`.

        NOTE: part of every work item's key; `submit` and `serve` must agree on it, so that a
        job run on either reuses the other's finished items (both: `engine.local.engine_fingerprint`).
        """
        fp = f"{self.model_name}|{dtype or self.dtype}|{max_model_len}|w={weights}|vllm={runtime}"
        fp += "|bos" if self.add_bos_token else ""
        return fp + "|batch-invariant" if self.batch_invariant else fp


def fingerprint_fields(fingerprint: str) -> dict[str, str | None]:
    """The weights identity (`weights`) and vLLM (`vllm`) an engine fingerprint names; None
    for each in a fingerprint from before they were part of it (`name|dtype|length`)."""
    parts = dict(p.split("=", 1) for p in fingerprint.split("|") if "=" in p)
    return {"weights": parts.get("w"), "vllm": parts.get("vllm")}


def fingerprint_numerics(fingerprint: str) -> dict[str, Any]:
    """The dtype (None if it names none) and BOS prefix an engine fingerprint names."""
    parts = fingerprint.split("|")
    return {"dtype": parts[1] if len(parts) > 1 else None, "add_bos_token": "bos" in parts[3:]}


def is_legacy_fingerprint(fingerprint: str) -> bool:
    """A fingerprint of an older conserve-bench, without weights identity or vLLM version:
    no engine has it any more."""
    return fingerprint_fields(fingerprint)["weights"] is None


DEFAULT_PARTIAL_TOKENS = 16
DEFAULT_PARTIAL_S = 2.0


@dataclass(frozen=True)
class RunConfig:
    """How the job runner feeds the engine.

    Generations in flight have their tokens so far saved (a partial, `store.partials`) once
    they have `partial_tokens` new tokens each, or every `partial_s` seconds;
    `partial_tokens=0` turns partial generations off (an interrupted generation starts over).
    The defaults are measured in docs/measured.md, *Partial generations*.
    """

    max_inflight: int = 64
    commit_every: int | None = None  # default: half the window, so the engine never idles
    partial_tokens: int = DEFAULT_PARTIAL_TOKENS
    partial_s: float = DEFAULT_PARTIAL_S

    def __post_init__(self):
        if self.max_inflight < 1:
            raise ValueError("--max-inflight must be at least 1")
        if self.partial_tokens < 0:
            raise ValueError("--partial-tokens must be 0 (off) or more")
        if self.partial_s <= 0:
            raise ValueError("--partial-s must be positive")
        if self.commit_every is None:
            object.__setattr__(self, "commit_every", max(1, self.max_inflight // 2))


@dataclass(frozen=True)
class LeaseConfig:
    """How long a replica owns what it claims, and how often an item may be tried.

    - `lease_s`: a claim lasts this long on the database's clock unless renewed; a replica
      that died is noticed by the others after at most this long. 30 s rides out a database
      restart or a stalled process, and costs little next to an evaluation of minutes.
    - `heartbeat_s`: a live replica renews its lease this often (six beats per lease by
      default, so five in a row may be lost before anything is reclaimed).
    - `max_attempts`: an item whose engine reported an error, or whose holder died, this
      many times is failed with its error instead of tried again (3: item errors are
      nearly always deterministic, and two unlucky crashes should not fail an item).
    """

    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    max_attempts: int = 3

    def __post_init__(self):
        if not self.lease_s > 0:
            raise ValueError("--lease-s must be positive")
        if not 0 < self.heartbeat_s <= self.lease_s / 2:
            raise ValueError(f"--heartbeat-s must be positive and at most half the lease "
                             f"({self.lease_s / 2:g} s), so one lost beat loses no lease")
        if self.max_attempts < 1:
            raise ValueError("--max-attempts must be at least 1")


# NOTE: the pool holds offline requests' KV only, at most what the device KV cache held of
# them times the preemptions in flight; a quarter of the memory free at start leaves the rest
# to the server, lm-eval's data and the OS. On the CPU build the pool takes pages only as it
# fills; on CUDA it is pinned, so committed whole at start-up.
KV_CHECKPOINT_SHARE_OF_FREE_RAM = 0.25
MAX_DEFAULT_KV_CHECKPOINT_GIB = 64.0


def default_kv_checkpoint_gib() -> float:
    """`--kv-checkpoint-gib` when not given: a share of this host's free memory, in quarters
    of a GiB (0 where the free memory is unknown)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0.0
    gib = KV_CHECKPOINT_SHARE_OF_FREE_RAM * free / 2**30
    return min(MAX_DEFAULT_KV_CHECKPOINT_GIB, int(gib * 4) / 4)


def default_db_url() -> str:
    return os.environ.get("CONSERVE_BENCH_DB", DEFAULT_DB_URL)


def default_data_dir() -> str | None:
    return os.environ.get("CONSERVE_BENCH_DATA") or None


def cache_home() -> Path:
    """Where converted models and lm-eval's task index live: `$CONSERVE_BENCH_HOME`, or
    `conserve-bench` under `$XDG_CACHE_HOME` (`~/.cache`)."""
    if home := os.environ.get("CONSERVE_BENCH_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "conserve-bench"
