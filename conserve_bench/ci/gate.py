"""Verdicts: a task's metric, as a finished run measured it, against its baseline.

One-sided: only a move past the tolerance in the worse direction fails; a move past it in the
better direction is "stale" (the baseline should be raised), which passes. With `wilson`, the
lower end of the Wilson score interval (scipy) must clear the threshold, so a small sample
cannot pass on luck. A NaN or infinite score is "invalid", never compared: it would pass every
comparison. Pure: reads lm-eval's results layout, never the store or an engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from conserve_bench.ci.suite import MetricCheck

# NOTE: a score exactly at the threshold passes; thresholds computed in floating point
# (0.35 - 0.05) may land a hair above it, hence the slack.
EPSILON = 1e-12


class Verdict(str, Enum):
    PASS = "pass"
    STALE = "stale"  # better than the baseline by more than the tolerance: passes
    FAIL = "fail"
    NEW = "new"  # no baseline yet (a --write-baseline run)
    MISSING = "missing"  # the run reported no such metric for the task: a config error
    INCOMPLETE = "incomplete"  # the task's job did not finish
    INVALID = "invalid"  # the run reported NaN or an infinity: nothing to compare, never a pass


@dataclass(frozen=True)
class Measured:
    """One task's metric in a finished run (a group: over its tasks' documents)."""

    value: float
    stderr: float | None
    n: int | None
    higher_is_better: bool


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    threshold: float | None = None
    lower_bound: float | None = None  # the Wilson bound, when gated on it
    detail: str = ""


def measure(results: dict[str, Any], task: str, metric: str) -> Measured | None:
    """`metric` (`acc,none`) of `task` from lm-eval's results layout, or None if not reported."""
    values = results.get("results", {}).get(task, {})
    value = values.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    base, _, flt = metric.partition(",")
    stderr = values.get(f"{base}_stderr,{flt}")
    sizes = [results.get("n-samples", {}).get(t, {}).get("effective") for t in leaf_tasks(results, task)]
    higher = results.get("higher_is_better", {}).get(task, {}).get(base, True)
    # NOTE: a NaN stderr (one document) is no stderr: written as a baseline's `atol` it would
    # make every later comparison pass.
    known = isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr)
    return Measured(float(value), float(stderr) if known else None,
                    sum(sizes) if sizes and None not in sizes else None, bool(higher))


def leaf_tasks(results: dict[str, Any], task: str) -> list[str]:
    """The tasks whose documents make up `task`: itself, or a group's tasks, recursively."""
    subtasks = results.get("group_subtasks", {}).get(task)
    if not subtasks:
        return [task]
    return [leaf for sub in subtasks for leaf in leaf_tasks(results, sub)]


def judge(check: MetricCheck, measured: Measured | None) -> Judgement:
    if measured is None:
        return Judgement(Verdict.MISSING, detail=f"the run reported no {check.name} for this task")
    if not math.isfinite(measured.value):
        # NOTE: before the baseline: NaN compares False both ways, so it would pass any gate,
        # and a --write-baseline run would record it.
        return Judgement(Verdict.INVALID, detail=f"the run reported {measured.value} for {check.name}: "
                                                 "not a finite number")
    if check.baseline is None:
        return Judgement(Verdict.NEW, detail="no baseline yet")
    higher = measured.higher_is_better if check.higher_is_better is None else check.higher_is_better
    sign = 1.0 if higher else -1.0
    threshold = check.baseline - sign * check.tolerance()
    gated, bound = measured.value, None
    if check.wilson is not None:
        if measured.n is None:
            return Judgement(Verdict.MISSING, threshold, detail="no sample size for the Wilson gate")
        gated = bound = wilson_lower_bound(measured.value, measured.n, check.wilson)
    if sign * (gated - threshold) < -EPSILON:
        what = (f"Wilson lower bound {bound:.4f} (n={measured.n})" if bound is not None
                else f"measured {measured.value:.4f}")
        return Judgement(Verdict.FAIL, threshold, bound,
                         f"{what} {'<' if higher else '>'} threshold {threshold:.4f}")
    if sign * (measured.value - (check.baseline + sign * check.tolerance())) > EPSILON:
        return Judgement(Verdict.STALE, threshold, bound,
                         f"measured {measured.value:.4f} beats baseline {check.baseline:.4f} "
                         "by more than the tolerance: baseline stale")
    return Judgement(Verdict.PASS, threshold, bound)


def wilson_lower_bound(value: float, n: int, confidence: float) -> float:
    """Lower end of the two-sided Wilson score interval of a proportion `value` over `n`."""
    from scipy.stats import binomtest

    successes = round(value * n)
    return float(binomtest(successes, n).proportion_ci(confidence, method="wilson").low)
