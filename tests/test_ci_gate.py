"""`ci` without an engine: verdicts, the statistics (checked against scipy directly), reports."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.ci import ExitCode
from conserve_bench.ci.suite import CIConfig, MetricCheck, TaskCheck
from conserve_bench.ci.gate import Measured, Verdict, judge, leaf_tasks, measure, wilson_lower_bound
from conserve_bench.ci.report import JobOutcome, build_report, to_junit, to_markdown
from conserve_bench.ci.stats import NUM_RESAMPLES, SEED, compare_paired, mcnemar_p


def acc(value, n=100, higher=True):
    return Measured(value, 0.05, n, higher)


# -- verdicts -------------------------------------------------------------------------------------


def test_one_sided_tolerance_absolute_and_relative():
    check = MetricCheck("acc,none", "acc", baseline=0.35, atol=0.05)
    at_threshold = judge(check, acc(0.30))  # 0.35 - 0.05 is 0.29999999999999993 in floats
    assert at_threshold.verdict == Verdict.PASS and at_threshold.threshold == pytest.approx(0.30)
    failed = judge(check, acc(0.2999))
    assert failed.verdict == Verdict.FAIL and failed.detail == "measured 0.2999 < threshold 0.3000"
    assert judge(check, acc(0.40)).verdict == Verdict.PASS
    stale = judge(check, acc(0.4001))
    assert stale.verdict == Verdict.STALE and "baseline stale" in stale.detail
    relative = MetricCheck("acc,none", "acc", baseline=0.5, rtol=0.1)
    assert [judge(relative, acc(v)).verdict for v in (0.44, 0.45, 0.55, 0.56)] == [
        Verdict.FAIL, Verdict.PASS, Verdict.PASS, Verdict.STALE]


def test_lower_is_better_fails_on_a_rise():
    check = MetricCheck("word_perplexity,none", "word_perplexity", baseline=20.0, rtol=0.1)
    assert judge(check, acc(22.5, higher=False)).verdict == Verdict.FAIL
    assert judge(check, acc(17.0, higher=False)).verdict == Verdict.STALE
    assert judge(check, acc(21.0, higher=False)).threshold == pytest.approx(22.0)
    forced = MetricCheck("x,none", "x", baseline=1.0, atol=0.1, higher_is_better=True)
    assert judge(forced, acc(0.8, higher=False)).verdict == Verdict.FAIL  # the config wins


def test_missing_and_new():
    check = MetricCheck("acc,none", "acc", baseline=0.3, atol=0.1)
    assert judge(check, None).verdict == Verdict.MISSING
    assert judge(MetricCheck("acc,none", "acc"), acc(0.3)).verdict == Verdict.NEW


def test_wilson_bound_is_scipys_and_the_textbook_formula():
    for successes, n, confidence in ((30, 50, 0.95), (1, 20, 0.9), (200, 200, 0.99)):
        direct = scipy.stats.binomtest(successes, n).proportion_ci(confidence, method="wilson").low
        assert wilson_lower_bound(successes / n, n, confidence) == direct
        z, p = scipy.stats.norm.ppf(0.5 + confidence / 2), successes / n
        formula = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
        assert direct == pytest.approx(formula, abs=1e-12)


def test_wilson_gate_fails_a_small_sample_that_the_point_estimate_would_pass():
    check = MetricCheck("acc,none", "acc", baseline=0.6, atol=0.1, wilson=0.95)
    small = judge(check, acc(0.6, n=20))
    assert small.verdict == Verdict.FAIL and small.lower_bound == pytest.approx(0.3866, abs=1e-4)
    assert small.detail.startswith("Wilson lower bound 0.3866 (n=20) < threshold 0.5000")
    assert judge(check, acc(0.6, n=2000)).verdict == Verdict.PASS


def test_measure_reads_lm_evals_layout_and_sums_a_groups_documents():
    results = {
        "results": {"grp": {"acc,none": 0.5, "acc_stderr,none": 0.1},
                    "a": {"acc,none": 0.4, "acc_stderr,none": "N/A"}, "b": {"acc,none": 0.6}},
        "group_subtasks": {"grp": ["a", "sub"], "sub": ["b"]},
        "n-samples": {"a": {"effective": 10, "original": 100}, "b": {"effective": 30}},
        "higher_is_better": {"grp": {"acc": True}, "a": {"acc": True}},
    }
    assert leaf_tasks(results, "grp") == ["a", "b"] and leaf_tasks(results, "a") == ["a"]
    assert measure(results, "grp", "acc,none") == Measured(0.5, 0.1, 40, True)
    assert measure(results, "a", "acc,none") == Measured(0.4, None, 10, True)
    assert measure(results, "a", "acc_norm,none") is None and measure(results, "zz", "acc,none") is None


# -- statistics -----------------------------------------------------------------------------------


def binary_runs(n=200, p=0.4, num_flips=0, seed=1):
    rng = random.Random(seed)
    before = {("t", i): int(rng.random() < p) for i in range(n)}
    after = dict(before)
    for key in [k for k, v in before.items() if v == 0][:num_flips]:
        after[key] = 1
    return after, before


def test_a_run_against_itself_is_delta_0_p_1():
    after, before = binary_runs()
    same = compare_paired(after, before)
    assert (same.test, same.delta, same.p, same.ci_low, same.ci_high) == ("mcnemar", 0.0, 1.0, 0.0, 0.0)
    scores = {("t", i): random.Random(i).random() for i in range(50)}
    same = compare_paired(scores, dict(scores))
    assert (same.test, same.delta, same.p) == ("bootstrap", 0.0, 1.0)


def test_mcnemar_is_scipys_exact_binomial_test_on_the_discordant_documents():
    assert mcnemar_p(9, 1) == pytest.approx(0.021484375)  # 2 * (1 + 10) / 2**10
    after, before = binary_runs(num_flips=15)
    for i in range(3):  # and three documents that got worse
        key = next(k for k, v in before.items() if v == 1 and after[k] == 1 and k[1] >= 10 * i)
        after[key] = 0
    found = compare_paired(after, before)
    better = sum(after[k] > before[k] for k in before)
    worse = sum(after[k] < before[k] for k in before)
    assert (found.num_better, found.num_worse) == (better, worse) == (15, 3)
    assert found.p == scipy.stats.binomtest(better, better + worse, 0.5).pvalue
    assert found.p < 0.05 and found.delta == pytest.approx(12 / 200)


def test_bootstrap_interval_is_scipys_paired_bootstrap():
    rng = np.random.default_rng(3)
    before = rng.normal(20, 5, 80)
    after = before + rng.normal(0.8, 1.5, 80)
    found = compare_paired({i: a for i, a in enumerate(after)}, {i: b for i, b in enumerate(before)})
    direct = scipy.stats.bootstrap((after, before), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
                                   paired=True, vectorized=True, method="percentile",
                                   n_resamples=NUM_RESAMPLES, rng=np.random.default_rng(SEED))
    assert (found.ci_low, found.ci_high) == (direct.confidence_interval.low, direct.confidence_interval.high)
    assert found.test == "bootstrap" and found.delta == pytest.approx(after.mean() - before.mean())
    shifted = np.abs(direct.bootstrap_distribution - found.delta)
    assert found.p == (1 + (shifted >= abs(found.delta)).sum()) / (NUM_RESAMPLES + 1)
    assert found.p < 0.01 < found.ci_low


def test_unshared_documents_are_not_compared():
    assert compare_paired({("a", 1): 1}, {("a", 2): 1}) is None
    partial = compare_paired({("a", 1): 1, ("a", 2): 0}, {("a", 2): 1, ("a", 3): 0})
    assert partial.num_paired == 1 and partial.delta == -1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_comparison_properties(pairs):
    after = {i: int(a) for i, (a, _) in enumerate(pairs)}
    before = {i: int(b) for i, (_, b) in enumerate(pairs)}
    found = compare_paired(after, before)
    assert 0 < found.p <= 1 and found.ci_low <= found.delta + 1e-12 and found.delta <= found.ci_high + 1e-12
    assert found.delta == pytest.approx((found.num_better - found.num_worse) / len(pairs))
    swapped = compare_paired(before, after)
    assert swapped.p == found.p and swapped.delta == pytest.approx(-found.delta)


# -- reports --------------------------------------------------------------------------------------


def fake_results(job_id, scores: dict[str, list[int]]):
    """lm-eval's layout for tasks scored 0/1 per document, with the per-document table."""
    return {
        "results": {t: {"alias": t, "acc,none": sum(v) / len(v), "acc_stderr,none": 0.1} for t, v in scores.items()},
        "n-samples": {t: {"effective": len(v)} for t, v in scores.items()},
        "higher_is_better": {t: {"acc": True} for t in scores},
        "task_hashes": {t: "h-" + t for t in scores},
        "per_sample": {t: {"doc_id": list(range(len(v))), "acc,none": v} for t, v in scores.items()},
        "conserve": {"job": {"id": job_id}, "engine": {"fingerprint": "m|float32|2048"}},
    }


SCORES = {"t1": [1, 1, 0, 1, 0, 1, 1, 1, 0, 1], "t2": [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]}


def config(path="ci/a.yaml", **baselines):
    tasks = tuple(TaskCheck(t, limit=10, metrics=(MetricCheck("acc,none", "acc", baseline=b, atol=0.05),),
                            task_hash="h-" + t if t != "t2" else "old")
                  for t, b in baselines.items())
    return CIConfig(path, "m", tasks, provenance={"model_fingerprint": "m|float32|2048"})


def report_for(cfg, results, reference=None, **kw):
    job = {"id": "job1", "state": "done", "done": 20, "total": 20, "run_key": "k/abc"}
    outcome = JobOutcome(cfg, tuple(t.name for t in cfg.tasks), job, results)
    return build_report([cfg], [outcome], reference, run_key="k", commit="abc123", **kw)


def test_pass_regression_stale_and_their_exit_codes():
    results = fake_results("job1", SCORES)
    passing = report_for(config(t1=0.7, t2=0.2), results)
    assert (passing.status, passing.exit_code) == ("pass", ExitCode.PASS)
    mixed = report_for(config(t1=0.9, t2=0.1), results)  # t1: 0.7 < 0.85; t2: 0.2 > 0.15
    assert [r.verdict for r in mixed.rows] == ["fail", "stale"]
    assert (mixed.status, mixed.exit_code) == ("regression", ExitCode.REGRESSION)
    assert mixed.notes == ("ci/a.yaml: t2: the task's documents, prompts or targets changed since the "
                           "baseline (task_hash differs)",)
    stale_only = report_for(config(t1=0.5, t2=0.2), results)
    assert stale_only.exit_code == ExitCode.PASS and stale_only.rows[0].verdict == "stale"


def test_an_unfinished_job_is_incomplete_never_a_pass():
    report = report_for(config(t1=0.7, t2=0.2), None, stopped="deadline reached: 0 of 1 jobs finished")
    assert (report.status, report.exit_code) == ("incomplete", ExitCode.INCOMPLETE)
    assert {r.verdict for r in report.rows} == {"incomplete"}
    assert "INCOMPLETE" in to_markdown(report) and "deadline reached" in to_markdown(report)
    error = report_for(config(t1=0.7, t2=0.2), None, error="cannot reach http://127.0.0.1:1")
    assert (error.status, error.exit_code) == ("error", ExitCode.INFRASTRUCTURE)


def test_a_metric_the_run_did_not_report_is_a_config_error():
    cfg = config(t1=0.7, t2=0.2)
    cfg = CIConfig(cfg.path, cfg.model, (cfg.tasks[0], TaskCheck("t2", metrics=(MetricCheck("f1,none", "f1", 0.5, 0.1),))))
    report = report_for(cfg, fake_results("job1", SCORES))
    assert report.rows[1].verdict == "missing" and report.exit_code == ExitCode.USAGE


def markdown_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]


def test_markdown_matches_the_json(tmp_path):
    results = fake_results("job1", SCORES)
    flipped = fake_results("job0", {"t1": [1] * 10, "t2": SCORES["t2"]})
    report = report_for(config(t1=0.9, t2=0.1), results, flipped, compared_to="job0")
    data = json.loads(json.dumps(report.to_dict()))
    rows = markdown_rows(to_markdown(report))
    assert len(rows) == len(data["rows"]) == 2
    for cells, row in zip(rows, data["rows"]):
        task, metric, baseline, measured, threshold, delta, p, verdict = cells
        assert (task, metric, verdict.strip("*")) == (row["task"], row["metric"], row["verdict"])
        for text, value in ((baseline, row["baseline"]), (measured, row["measured"]), (threshold, row["threshold"])):
            assert float(text) == pytest.approx(value, abs=5e-5)
        point, interval = delta.split(" [")
        low, high = interval.rstrip("]").split(", ")
        for text, value in ((point, row["delta"]), (low, row["ci_low"]), (high, row["ci_high"])):
            assert float(text) == pytest.approx(value, abs=5e-5)
        assert float(p) == pytest.approx(row["p"], rel=1e-3)
    assert data["rows"][0]["delta"] == pytest.approx(-0.3) and data["rows"][0]["p"] == pytest.approx(0.25)
    assert data["rows"][1]["delta"] == 0.0 and data["rows"][1]["p"] == 1.0


def test_junit_parses_with_a_junit_library(tmp_path):
    from junitparser import Error, Failure, JUnitXml, Properties

    cfg = config(t1=0.9, t2=0.1)
    path = tmp_path / "junit.xml"
    path.write_text(to_junit(report_for(cfg, fake_results("job1", SCORES))))
    xml = JUnitXml.fromfile(str(path))
    (suite,) = list(xml)
    assert (suite.name, suite.tests, suite.failures, suite.errors) == ("ci/a.yaml", 2, 1, 0)
    assert {p.name: p.value for p in suite.properties()} == {
        "model": "m", "commit": "abc123", "run_key": "k", "status": "regression"}
    cases = {(c.classname, c.name): c for c in suite}
    assert set(cases) == {("t1", "acc,none"), ("t2", "acc,none")}
    (failure,) = cases[("t1", "acc,none")].result
    assert isinstance(failure, Failure) and failure.message == "measured 0.7000 < threshold 0.8500"
    assert cases[("t2", "acc,none")].is_passed and "stale" in cases[("t2", "acc,none")].system_out
    props = {p.name: p.value for p in next(cases[("t1", "acc,none")].iterchildren(Properties))}
    assert props == {"model": "m", "commit": "abc123", "n": "10", "job_id": "job1"}
    incomplete = tmp_path / "incomplete.xml"
    incomplete.write_text(to_junit(report_for(cfg, None, stopped="interrupted by SIGTERM")))
    errors = [c.result[0] for s in JUnitXml.fromfile(str(incomplete)) for c in s]
    assert all(isinstance(e, Error) and "interrupted by SIGTERM" in e.message for e in errors) and len(errors) == 2


# -- stopping ---------------------------------------------------------------------------------------


def test_stopper_deadline_margin_and_signals():
    import signal

    from conserve_bench.ci.nightly import STOP_MARGIN_S, Stopper, parse_deadline

    now = [0.0]
    stopper = Stopper(deadline=100.0, clock=lambda: now[0])
    now[0] = 100.0 - STOP_MARGIN_S - 0.01
    assert not stopper() and stopper.reason is None
    now[0] = 100.0 - STOP_MARGIN_S  # stop claiming in time to release, report and exit
    assert stopper() and stopper.reason == "deadline reached"
    stopper.on_signal(signal.SIGTERM)
    assert stopper.reason == "interrupted by SIGTERM"
    with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
        stopper.on_signal(signal.SIGINT)
    assert not Stopper()()
    assert parse_deadline("2030-01-01T00:00:00Z", "90m", now=lambda: 1000.0) == 1000.0 + 5400
    assert parse_deadline("1893456000", None) == parse_deadline("2030-01-01T00:00:00+00:00", None)
    assert parse_deadline(None, "1h30m", now=lambda: 0.0) == parse_deadline(None, "5400", now=lambda: 0.0)
