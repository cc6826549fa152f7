"""The CI report: rows of (task, metric) verdicts from finished jobs, and its three renderings.

`build_report` turns configs plus each job's results (None: not finished) into a `Report`,
with a paired comparison per row when a reference run is given. Rendered as markdown (the
log and `$GITHUB_STEP_SUMMARY`), JUnit XML (one test case per task and metric) and JSON; all
three carry the same rows. A NaN or infinite score is an "invalid" row (a JUnit error; its value
only in the detail, so the JSON stays strict) and fails the run with the regression's exit code:
the gate cannot clear the model, and a rerun reattaches to the same finished results, so it is
neither infrastructure to retry nor a config to fix. Pure: no store, no engine, no clock.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from conserve_bench.ci import ExitCode
from conserve_bench.ci.suite import CIConfig, MetricCheck, TaskCheck
from conserve_bench.ci.gate import Measured, Verdict, judge, leaf_tasks, measure
from conserve_bench.ci.stats import Comparison, compare_paired
from conserve_bench.jobs.samples import PER_SAMPLE_KEY, metric_values
from conserve_bench.store.states import JobState

STATUS_EXIT = {"pass": ExitCode.PASS, "baseline written": ExitCode.PASS, "regression": ExitCode.REGRESSION,
               "invalid": ExitCode.REGRESSION, "config error": ExitCode.USAGE, "error": ExitCode.INFRASTRUCTURE,
               "incomplete": ExitCode.INCOMPLETE}
MEAN_SLACK = 1e-9  # a per-document table is comparable when its mean is the reported score


@dataclass(frozen=True)
class Row:
    config: str
    model: str
    task: str
    metric: str  # lm-eval's `metric,filter`
    verdict: str
    baseline: float | None = None
    measured: float | None = None
    threshold: float | None = None
    wilson_lower_bound: float | None = None
    n: int | None = None
    stderr: float | None = None
    delta: float | None = None  # vs the compared run when there is one, else vs the baseline
    ci_low: float | None = None
    ci_high: float | None = None
    p: float | None = None
    test: str | None = None  # "mcnemar" | "bootstrap"
    num_paired: int | None = None
    detail: str = ""
    job_id: str | None = None


@dataclass(frozen=True)
class Report:
    status: str  # pass | baseline written | regression | invalid | config error | error | incomplete
    exit_code: int
    rows: tuple[Row, ...]
    jobs: tuple[dict[str, Any], ...] = ()
    run_key: str | None = None
    commit: str | None = None
    compared_to: str | None = None
    message: str | None = None  # why the run stopped or failed
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JobOutcome:
    """One job of the run: the config and tasks it covers, and its results when finished."""

    config: CIConfig
    tasks: tuple[str, ...]
    job: dict[str, Any]  # the store's / server's job object
    results: dict[str, Any] | None


def build_report(configs: Sequence[CIConfig], outcomes: Sequence[JobOutcome],
                 reference: dict[str, Any] | None = None, *, run_key: str | None = None,
                 commit: str | None = None, compared_to: str | None = None,
                 stopped: str | None = None, error: str | None = None) -> Report:
    by_task = {(o.config.path, t): o for o in outcomes for t in o.tasks}
    rows, notes = [], []
    for cfg in configs:
        for task in cfg.tasks:
            outcome = by_task.get((cfg.path, task.name))
            rows.extend(task_rows(cfg, task, outcome, reference))
            if outcome and outcome.results:
                notes.extend(provenance_notes(cfg, task, outcome.results))
    status = _status(rows, stopped, error)
    return Report(status, int(STATUS_EXIT[status]), tuple(rows),
                  tuple(_job_line(o) for o in outcomes), run_key, commit, compared_to,
                  error or stopped, tuple(dict.fromkeys(notes)))


def with_baselines_written(report: Report, paths: Sequence[str]) -> Report:
    """The report of a --write-baseline run once its configs hold the new baselines: a pass
    (its verdicts, against the old baselines, only tell what moved)."""
    note = f"baselines written to {', '.join(paths)}"
    return replace(report, status="baseline written", exit_code=int(ExitCode.PASS),
                   notes=(*report.notes, note))


def task_rows(cfg: CIConfig, task: TaskCheck, outcome: JobOutcome | None,
              reference: dict[str, Any] | None) -> list[Row]:
    results = outcome.results if outcome else None
    checks = task.metrics or reported_metrics(results, task.name)
    common = dict(config=cfg.path, model=cfg.model, task=task.name,
                  job_id=outcome.job["id"] if outcome else None)
    if results is None:
        return [Row(**common, metric=c.name, verdict=Verdict.INCOMPLETE.value, baseline=c.baseline,
                    detail="its job did not finish") for c in checks]
    return [_row(common, c, measure(results, task.name, c.name), results, reference)
            for c in checks]


def _row(common: dict[str, Any], check: MetricCheck, measured: Measured | None,
         results: dict[str, Any], reference: dict[str, Any] | None) -> Row:
    judged = judge(check, measured)
    row = Row(**common, metric=check.name, verdict=judged.verdict.value, baseline=check.baseline,
              threshold=judged.threshold, wilson_lower_bound=judged.lower_bound, detail=judged.detail)
    if measured is None or judged.verdict == Verdict.INVALID:
        return row  # NOTE: no NaN in `measured`: strict JSON parsers (jq, JSON.parse) refuse it
    row = replace(row, measured=measured.value, n=measured.n, stderr=measured.stderr,
                   delta=measured.value - check.baseline if check.baseline is not None else None)
    if reference is not None:
        comparison = paired_comparison(results, reference, common["task"], check.name, measured)
        row = _with_comparison(row, comparison)
    return row


def paired_comparison(results: dict[str, Any], reference: dict[str, Any], task: str,
                      metric: str, measured: Measured) -> Comparison | str:
    """The paired comparison of one task's metric with the reference run, or why there is none."""
    current = metric_values(results.get(PER_SAMPLE_KEY, {}), leaf_tasks(results, task), metric)
    if not current or not math.isclose(sum(current.values()) / len(current), measured.value,
                                       rel_tol=MEAN_SLACK, abs_tol=MEAN_SLACK):
        return "not comparable per document (the score is not a mean over documents)"
    before = metric_values(reference.get(PER_SAMPLE_KEY, {}), leaf_tasks(reference, task), metric)
    return compare_paired(current, before) or "the compared run scored none of these documents"


def _with_comparison(row: Row, comparison: Comparison | str) -> Row:
    if isinstance(comparison, str):
        return replace(row, delta=None, detail=_join(row.detail, comparison))
    return replace(row, delta=comparison.delta, ci_low=comparison.ci_low, ci_high=comparison.ci_high,
                    p=comparison.p, test=comparison.test, num_paired=comparison.num_paired,
                    detail=_join(row.detail, f"{comparison.num_better} documents better, "
                                             f"{comparison.num_worse} worse ({comparison.test})"))


def reported_metrics(results: dict[str, Any] | None, task: str) -> tuple[MetricCheck, ...]:
    """Every metric a task reported (a baseline run that names none): `acc,none`, not stderrs."""
    values = (results or {}).get("results", {}).get(task, {})
    return tuple(MetricCheck(name, name.removesuffix(",none")) for name, value in values.items()
                 if "," in name and "_stderr" not in name and isinstance(value, (int, float))
                 and not isinstance(value, bool))


def provenance_notes(cfg: CIConfig, task: TaskCheck, results: dict[str, Any]) -> list[str]:
    """What changed since the baseline was written: the task's documents or prompts, the model."""
    notes = []
    current_hash = results.get("task_hashes", {}).get(task.name)
    if task.task_hash and current_hash and task.task_hash != current_hash:
        notes.append(f"{cfg.path}: {task.name}: the task's documents, prompts or targets changed "
                     "since the baseline (task_hash differs)")
    recorded = cfg.provenance.get("model_fingerprint")
    fingerprint = results.get("conserve", {}).get("engine", {}).get("fingerprint")
    if recorded and fingerprint and recorded != fingerprint:
        notes.append(f"{cfg.path}: the baseline was measured on {recorded}, this run on {fingerprint}")
    return notes


def _status(rows: Sequence[Row], stopped: str | None, error: str | None) -> str:
    verdicts = {r.verdict for r in rows}
    if error:
        return "error"
    if stopped or Verdict.INCOMPLETE.value in verdicts:
        return "incomplete"
    if Verdict.MISSING.value in verdicts:
        return "config error"
    if Verdict.INVALID.value in verdicts:
        return "invalid"
    return "regression" if Verdict.FAIL.value in verdicts else "pass"


def _job_line(outcome: JobOutcome) -> dict[str, Any]:
    job = outcome.job
    return {"config": outcome.config.path, "id": job["id"], "run_key": job.get("run_key"),
            "tasks": list(outcome.tasks), "state": JobState.DONE if outcome.results else job["state"],
            "done": job["done"], "total": job["total"]}


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# -- renderings -----------------------------------------------------------------------------------

COLUMNS = ("task", "metric", "baseline", "measured", "threshold", "Δ", "p", "verdict")


def to_markdown(report: Report) -> str:
    lines = [f"## conserve-bench ci: {report.status.upper()}", ""]
    facts = [f"run key `{report.run_key}`" if report.run_key else "",
             f"commit `{report.commit}`" if report.commit else "",
             f"Δ and p vs `{report.compared_to}` (paired)" if report.compared_to else "Δ vs baseline"]
    lines += [" · ".join(f for f in facts if f), ""]
    if report.message:
        lines += [f"**{report.message}**", ""]
    for config in dict.fromkeys(r.config for r in report.rows):
        rows = [r for r in report.rows if r.config == config]
        lines += [f"### `{config}` ({rows[0].model})", "", _md_row(COLUMNS),
                  _md_row(("---",) * len(COLUMNS))]
        lines += [_md_row(markdown_cells(r)) for r in rows]
        lines += ["", *(_job_md(j) for j in report.jobs if j["config"] == config), ""]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def markdown_cells(row: Row) -> tuple[str, ...]:
    delta = _num(row.delta, signed=True)
    if row.ci_low is not None:
        delta += f" [{_num(row.ci_low, signed=True)}, {_num(row.ci_high, signed=True)}]"
    verdict = f"**{row.verdict}**" if row.verdict != Verdict.PASS.value else row.verdict
    measured = "not finite" if row.verdict == Verdict.INVALID.value else _num(row.measured)
    return (row.task, row.metric, _num(row.baseline), measured, _num(row.threshold),
            delta, "" if row.p is None else f"{row.p:.4g}", verdict)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _job_md(job: dict[str, Any]) -> str:
    key = f", run key `{job['run_key']}`" if job.get("run_key") else ""
    return f"job `{job['id']}` ({', '.join(job['tasks'])}): {job['state']}, {job['done']}/{job['total']} items{key}  "


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def to_junit(report: Report) -> str:
    """JUnit XML: a suite per config file, a case per task and metric (classname = task)."""
    root = ET.Element("testsuites", name="conserve-bench ci")
    for config in dict.fromkeys(r.config for r in report.rows):
        rows = [r for r in report.rows if r.config == config]
        suite = ET.SubElement(root, "testsuite", name=config, tests=str(len(rows)),
                              failures=str(sum(r.verdict == Verdict.FAIL.value for r in rows)),
                              errors=str(sum(_is_error(r) for r in rows)), skipped="0")
        _properties(suite, model=rows[0].model, commit=report.commit, run_key=report.run_key,
                    status=report.status)
        for row in rows:
            _junit_case(suite, row, report)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _junit_case(suite: ET.Element, row: Row, report: Report) -> None:
    case = ET.SubElement(suite, "testcase", classname=row.task, name=row.metric)
    _properties(case, model=row.model, commit=report.commit, n=row.n, job_id=row.job_id)
    cells = dict(zip(COLUMNS, markdown_cells(row)))
    text = ", ".join(f"{k} {v}" for k, v in cells.items() if v and k not in ("task", "metric", "verdict"))
    if row.verdict == Verdict.FAIL.value:
        ET.SubElement(case, "failure", message=row.detail, type="regression").text = text
    elif _is_error(row):
        message = _join(row.detail, report.message or "") if row.verdict == Verdict.INCOMPLETE.value else row.detail
        ET.SubElement(case, "error", message=message, type=row.verdict).text = text
    else:
        ET.SubElement(case, "system-out").text = _join(f"{row.verdict}: {text}", row.detail)


def _is_error(row: Row) -> bool:
    return row.verdict in (Verdict.INCOMPLETE.value, Verdict.MISSING.value, Verdict.INVALID.value)


def _properties(parent: ET.Element, **values: Any) -> None:
    props = ET.SubElement(parent, "properties")
    for name, value in values.items():
        if value is not None:
            ET.SubElement(props, "property", name=name, value=str(value))
