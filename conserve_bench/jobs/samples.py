"""A job's logged samples: lm-eval's sample lines, and the per-document table of metric values.

lm-eval's logged samples (documents, prompts, responses) are written, on request (`submit
--log-samples`), as lm-eval's `EvaluationTracker` writes them (`sample_lines`). Always, they are
reduced to task -> doc_id -> metric -> value, keeping only numbers (0/1 accuracies, exact
matches, per-document scores; not the (loglikelihood, length) pairs of perplexities): the
table that pairs two runs question by question. It is stored with the job's results
(`per_sample`) and written beside the results file as JSON lines, one per document, without
prompts or outputs. Also computes lm-eval's task hashes from the samples.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PER_SAMPLE_KEY = "per_sample"
SAMPLES_SUFFIX = ".samples.jsonl"

# task -> {"doc_id": [...], "<metric>,<filter>": [...]} (columns of equal length; None = absent)
SampleTable = dict[str, dict[str, list]]


def sample_table(samples: dict[str, list[dict[str, Any]]]) -> SampleTable:
    """lm-eval's `samples` (from `simple_evaluate(log_samples=True)`) as a compact table."""
    return {task: _task_columns(rows) for task, rows in samples.items()}


def _task_columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    by_doc: dict[int, dict[str, float]] = {}
    for row in rows:  # NOTE: one row per document and filter (e.g. strict-match, flexible-extract)
        values = by_doc.setdefault(int(row["doc_id"]), {})
        for metric in row["metrics"]:
            if (value := _number(row.get(metric))) is not None:
                values[f"{metric},{row['filter']}"] = value
    return _columns(by_doc)


def _columns(by_doc: dict[int, dict[str, float]]) -> dict[str, list]:
    doc_ids = sorted(by_doc)
    names = sorted({name for values in by_doc.values() for name in values})
    return {"doc_id": doc_ids, **{n: [by_doc[d].get(n) for d in doc_ids] for n in names}}


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (int, float)) else None


def sample_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A task's samples as the lines of lm-eval's `samples_<task>_<date>.jsonl`.

    NOTE: exactly `EvaluationTracker.save_results_samples`' sanitizing (arguments as
    `gen_args_<i>` -> `arg_<j>`, responses as lists of strings, the target a string), so that
    lm-eval's readers (`datasets`, Zeno, W&B) load them; tests/test_output_layout.py compares.
    """
    from lm_eval.utils import handle_non_serializable, sanitize_list

    return [json.dumps(_sample_row(row, sanitize_list), default=handle_non_serializable,
                       ensure_ascii=False) + "\n" for row in rows]


def _sample_row(row: dict[str, Any], sanitize_list) -> dict[str, Any]:
    arguments = {f"gen_args_{i}": {f"arg_{j}": arg for j, arg in enumerate(args)}
                 for i, args in enumerate(row["arguments"])}
    return {**row, "arguments": arguments, "resps": sanitize_list(row["resps"]),
            "filtered_resps": sanitize_list(row["filtered_resps"]), "target": str(row["target"])}


def task_hashes(samples: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Per task, the hash lm-eval's EvaluationTracker records (`task_hashes`): it changes when
    a document, prompt or target of the task changes."""
    from lm_eval.utils import hash_string

    return {task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                      for s in rows))
            for task, rows in samples.items()}


def metric_values(table: SampleTable, tasks: Iterable[str], metric: str) -> dict[tuple[str, int], float]:
    """(task, doc_id) -> value of `metric` over `tasks` (a group's leaf tasks, or one task)."""
    out: dict[tuple[str, int], float] = {}
    for task in tasks:
        columns = table.get(task, {})
        for doc_id, value in zip(columns.get("doc_id", []), columns.get(metric, [])):
            if value is not None:
                out[(task, doc_id)] = value
    return out


def samples_path(results_path: str | Path) -> Path:
    """Where the table of `results/<job-id>.json` is: `results/<job-id>.samples.jsonl`."""
    path = Path(results_path)
    return path.with_name(path.name.removesuffix(".json") + SAMPLES_SUFFIX)


def write_samples_file(table: SampleTable, path: Path) -> Path:
    lines = []
    for task, columns in table.items():
        names = [n for n in columns if n != "doc_id"]
        for i, doc_id in enumerate(columns["doc_id"]):
            values = {n: columns[n][i] for n in names if columns[n][i] is not None}
            lines.append(json.dumps({"task": task, "doc_id": doc_id, **values}))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return path


def read_samples_file(path: Path) -> SampleTable:
    by_task: dict[str, dict[int, dict[str, float]]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_task.setdefault(row.pop("task"), {})[row.pop("doc_id")] = row
    return {task: _columns(by_doc) for task, by_doc in by_task.items()}
