"""CI config files: YAML -> frozen `CIConfig`s, every key checked before anything runs.

One file is one model and its tasks; each task has its settings (file-level `limit`,
`num_fewshot`, `gen_kwargs` as defaults, fixed `samples` per task; file-wide, lm-eval's chat
options `apply_chat_template`, `fewshot_as_multiturn`, `system_instruction`) and, per metric, a baseline
with a one-sided tolerance (`atol` or `rtol`) and optionally a Wilson gate. A malformed file
raises `CIConfigError`: one line naming the file, the key and the problem. Reads files only.

    model: smollm2-135m
    dtype: auto              # and the model's other options (`ModelOptions`), lm-eval vllm's names
    limit: 50
    tasks:
      mmlu_local_anatomy:
        metrics:
          acc: {baseline: 0.42, atol: 0.05, wilson: 0.95}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conserve_bench.config import JobSpec, ModelOptions
from conserve_bench.errors import ConserveError

CONFIG_SUFFIXES = (".yaml", ".yml")
# lm-eval's chat options, file-wide (one model, one way of prompting it): `JobSpec`'s fields
CHAT_KEYS = ("apply_chat_template", "fewshot_as_multiturn", "system_instruction")
# how the model is loaded: `ModelOptions`'s fields, file-wide beside `model`
MODEL_KEYS = ("dtype", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "revision",
              "trust_remote_code", "add_bos_token", "seed")
FILE_KEYS = ("model", "data_dir", "limit", "num_fewshot", "gen_kwargs", "tasks", "provenance",
             *CHAT_KEYS, *MODEL_KEYS)
TASK_KEYS = ("limit", "num_fewshot", "gen_kwargs", "samples", "metrics", "task_hash")
METRIC_KEYS = ("baseline", "atol", "rtol", "wilson", "higher_is_better", "n", "stderr")
# NOTE: lm-eval metrics whose per-document value is 0 or 1, so that their score is a
# proportion and a Wilson interval means something; the gate is refused for any other.
PROPORTION_METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match")


class CIConfigError(ConserveError):
    """A malformed CI config: `<file>: <key>: <problem>`."""


@dataclass(frozen=True)
class MetricCheck:
    """One metric of one task: `name` is lm-eval's `metric,filter` (`acc` means `acc,none`)."""

    name: str
    key: str  # as written in the file
    baseline: float | None = None
    atol: float | None = None
    rtol: float | None = None
    wilson: float | None = None  # confidence of the Wilson interval whose lower end is gated
    higher_is_better: bool | None = None  # None: as lm-eval reports it
    n: int | None = None  # recorded with the baseline
    stderr: float | None = None

    def tolerance(self) -> float:
        """How far the score may move from the baseline, in the metric's units."""
        return self.atol if self.atol is not None else abs(self.baseline) * self.rtol


@dataclass(frozen=True)
class TaskCheck:
    """A task, its effective settings (file defaults applied), and its metrics."""

    name: str
    limit: int | None = None
    num_fewshot: int | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    samples: tuple[int, ...] | None = None
    metrics: tuple[MetricCheck, ...] = ()  # empty: every metric the task reports (baseline runs)
    task_hash: str | None = None


@dataclass(frozen=True)
class CIConfig:
    path: str
    model: str
    tasks: tuple[TaskCheck, ...]
    data_dir: str | None = None  # absolute
    provenance: dict[str, Any] = field(default_factory=dict)
    chat: dict[str, Any] = field(default_factory=dict)  # CHAT_KEYS given, as JobSpec takes them
    model_options: ModelOptions = ModelOptions()

    def job_specs(self) -> list[JobSpec]:
        """One job per distinct set of settings (most files: one), tasks in file order."""
        groups: dict[tuple, list[TaskCheck]] = {}
        for task in self.tasks:
            key = (task.limit, task.num_fewshot, json.dumps(task.gen_kwargs, sort_keys=True))
            groups.setdefault(key, []).append(task)
        return [JobSpec(tasks=tuple(t.name for t in group), model=self.model, limit=group[0].limit,
                        num_fewshot=group[0].num_fewshot, gen_kwargs=dict(group[0].gen_kwargs),
                        data_dir=self.data_dir,
                        samples={t.name: list(t.samples) for t in group if t.samples} or None,
                        model_options=self.model_options, **self.chat)
                for group in groups.values()]


def job_run_key(run_key: str, spec: JobSpec) -> str:
    """The run key of one job of a CI run: the user's key plus a digest of what the job is,
    so that each config file and settings group gets its own job, and a changed config a new one."""
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"{run_key}/{digest[:12]}"


def config_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and the *.yaml / *.yml files of the directories named, in order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())
            if not found:
                raise CIConfigError(f"{raw}: no .yaml or .yml file in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CIConfigError(f"{raw}: no such file or directory")
    return files


def load_configs(paths: Sequence[str], needs_baselines: bool = True,
                 default_data_dir: str | None = None) -> list[CIConfig]:
    """Parse and check every file first; any problem raises before anything runs."""
    return [load_config(p, needs_baselines, default_data_dir) for p in config_files(paths)]


def load_config(path: Path, needs_baselines: bool = True,
                default_data_dir: str | None = None) -> CIConfig:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CIConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CIConfigError(f"{path}: cannot read: {e}") from None
    return _Reader(str(path), needs_baselines).config(raw, path, default_data_dir)


class _Reader:
    """Checks one file's data, naming the file and the dotted key of every problem."""

    def __init__(self, path: str, needs_baselines: bool):
        self.path, self.needs_baselines = path, needs_baselines

    def fail(self, key: str, problem: str) -> CIConfigError:
        return CIConfigError(f"{self.path}: {key}: {problem}")

    def config(self, raw: Any, path: Path, default_data_dir: str | None) -> CIConfig:
        raw = self.mapping(raw, "(top level)", FILE_KEYS)
        model = raw.get("model")
        if not isinstance(model, str) or not model.strip():
            raise self.fail("model", "required: a model name, directory or hub id")
        data_dir = self.text(raw, "data_dir", "data_dir")
        data_dir = str((path.parent / data_dir).resolve()) if data_dir else default_data_dir
        defaults = self.settings(raw, "")
        tasks = self.mapping(raw.get("tasks"), "tasks", None, required=True)
        if not tasks:
            raise self.fail("tasks", "at least one task is required")
        checks = tuple(self.task(str(name), spec, defaults) for name, spec in tasks.items())
        provenance = self.mapping(raw.get("provenance") or {}, "provenance", None)
        return CIConfig(str(path), model.strip(), checks, data_dir, provenance, self.chat(raw),
                        self.model_options(raw))

    def model_options(self, raw: dict[str, Any]) -> ModelOptions:
        """The model options given (MODEL_KEYS), each checked as the command line checks it."""
        given = {k: raw[k] for k in MODEL_KEYS if k in raw}
        for key, value in given.items():
            try:
                ModelOptions(**{key: value})
            except ValueError as e:  # NOTE: its message names the flag: `--dtype must be ...`
                raise self.fail(key, str(e).removeprefix(f"--{key.replace('_', '-')} ")) from None
        return ModelOptions(**given)

    def chat(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The chat options given, checked as a job checks them (`JobSpec._check_chat`)."""
        kinds = {"apply_chat_template": ((bool, str), "true, false or a template name"),
                 "fewshot_as_multiturn": ((bool,), "true or false"),
                 "system_instruction": ((str,), "text")}
        chat = {}
        for key, (types, expected) in kinds.items():
            if key in raw and raw[key] is not None:
                if not isinstance(raw[key], types) or raw[key] == "":
                    raise self.fail(key, f"must be {expected}, got {raw[key]!r}")
                chat[key] = raw[key]
        try:
            JobSpec(tasks=("check",), **chat)
        except ValueError as e:
            raise self.fail("fewshot_as_multiturn", str(e)) from None
        return chat

    def settings(self, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for name, low in (("limit", 1), ("num_fewshot", 0)):
            if name in raw:
                out[name] = self.integer(raw[name], prefix + name, low)
        if "gen_kwargs" in raw:
            out["gen_kwargs"] = self.mapping(raw["gen_kwargs"], prefix + "gen_kwargs", None)
        return out

    def task(self, name: str, raw: Any, defaults: dict[str, Any]) -> TaskCheck:
        prefix = f"tasks.{name}"
        raw = self.mapping(raw if raw is not None else {}, prefix, TASK_KEYS)
        settings = {**defaults, **self.settings(raw, prefix + ".")}
        samples = self.samples(raw.get("samples"), prefix + ".samples") if "samples" in raw else None
        if samples is not None:
            if "limit" in raw:
                raise self.fail(prefix + ".samples", "give samples or limit, not both")
            settings.pop("limit", None)  # fixed documents replace the file's limit
        metrics = self.metrics(raw.get("metrics"), prefix + ".metrics")
        task_hash = self.text(raw, "task_hash", prefix + ".task_hash")
        return TaskCheck(name, samples=samples, metrics=metrics, task_hash=task_hash, **settings)

    def samples(self, raw: Any, key: str) -> tuple[int, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.fail(key, "must be a non-empty list of document indices")
        indices = [self.integer(v, key, 0) for v in raw]
        if len(set(indices)) != len(indices):
            raise self.fail(key, "lists a document twice")
        return tuple(sorted(indices))

    def metrics(self, raw: Any, key: str) -> tuple[MetricCheck, ...]:
        if raw is None:
            if self.needs_baselines:
                raise self.fail(key, "required (or run with --write-baseline to record them)")
            return ()
        if isinstance(raw, list):
            raw = {self.metric_key(m, key): None for m in raw}
        raw = self.mapping(raw, key, None)
        if not raw:
            raise self.fail(key, "at least one metric is required")
        if len({_full_name(str(name)) for name in raw}) < len(raw):
            raise self.fail(key, "names a metric twice (acc is acc,none)")
        return tuple(self.metric(str(name), spec, f"{key}.{name}") for name, spec in raw.items())

    def metric_key(self, name: Any, key: str) -> str:
        if not isinstance(name, str) or not name:
            raise self.fail(key, f"metric names must be text, got {name!r}")
        return name

    def metric(self, name: str, raw: Any, key: str) -> MetricCheck:
        raw = self.mapping(raw if raw is not None else {}, key, METRIC_KEYS)
        full = _full_name(name)
        values = {k: self.number(raw[k], f"{key}.{k}") for k in ("baseline", "atol", "rtol", "stderr")
                  if raw.get(k) is not None}
        for k in ("atol", "rtol", "stderr"):
            if values.get(k, 0) < 0:
                raise self.fail(f"{key}.{k}", "must be 0 or more")
        if "atol" in values and "rtol" in values:
            raise self.fail(key, "give atol or rtol, not both")
        if self.needs_baselines:
            self.require_gate(values, key)
        higher = self.flag(raw, "higher_is_better", key)
        wilson = self.wilson(raw, full, key)
        if wilson is not None and higher is False:
            raise self.fail(f"{key}.wilson", "gates a proportion from below; not with higher_is_better: false")
        return MetricCheck(full, name, **values, wilson=wilson, higher_is_better=higher,
                           n=self.integer(raw["n"], f"{key}.n", 1) if raw.get("n") is not None else None)

    def require_gate(self, values: dict[str, float], key: str) -> None:
        if "baseline" not in values:
            raise self.fail(f"{key}.baseline", "required (or run with --write-baseline)")
        if "atol" not in values and "rtol" not in values:
            raise self.fail(key, "a tolerance is required: atol (absolute) or rtol (relative)")

    def wilson(self, raw: dict[str, Any], full: str, key: str) -> float | None:
        if raw.get("wilson") is None:
            return None
        confidence = self.number(raw["wilson"], f"{key}.wilson")
        if not 0 < confidence < 1:
            raise self.fail(f"{key}.wilson", f"a confidence between 0 and 1, got {confidence}")
        if full.partition(",")[0] not in PROPORTION_METRICS:
            raise self.fail(f"{key}.wilson", f"{full.partition(',')[0]} is not a proportion; the "
                            f"Wilson gate takes {', '.join(PROPORTION_METRICS)}")
        return confidence

    # -- scalars --------------------------------------------------------------------------------

    def mapping(self, raw: Any, key: str, allowed: Iterable[str] | None,
                required: bool = False) -> dict[str, Any]:
        if raw is None and required:
            raise self.fail(key, "required")
        if not isinstance(raw, dict):
            raise self.fail(key, f"must be a mapping, got {_kind(raw)}")
        if allowed is not None and (unknown := [k for k in raw if k not in allowed]):
            raise self.fail(f"{key}.{unknown[0]}" if key != "(top level)" else str(unknown[0]),
                            f"unknown key (expected one of {', '.join(allowed)})")
        return raw

    def integer(self, raw: Any, key: str, low: int) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < low:
            raise self.fail(key, f"must be a whole number >= {low}, got {raw!r}")
        return raw

    def number(self, raw: Any, key: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise self.fail(key, f"must be a number, got {raw!r}")
        return float(raw)

    def flag(self, raw: dict[str, Any], name: str, key: str) -> bool | None:
        if raw.get(name) is None:
            return None
        if not isinstance(raw[name], bool):
            raise self.fail(f"{key}.{name}", f"must be true or false, got {raw[name]!r}")
        return raw[name]

    def text(self, raw: dict[str, Any], name: str, key: str) -> str | None:
        value = raw.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.fail(key, f"must be text, got {value!r}")
        return value


def _full_name(metric: str) -> str:
    """lm-eval's `metric,filter`: a metric named without a filter is the unfiltered one."""
    return metric if "," in metric else f"{metric},none"


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
