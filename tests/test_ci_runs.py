"""`conserve-bench ci` on real scores: the session engine runs small local-MMLU jobs.

A baseline run writes its config; the CLI then gates against it (the job is found by run key
and done, so the CLI starts no engine): pass, an injected regression, a stale baseline. A run
stopped at its deadline is INCOMPLETE (exit 4), and the same run key completes it computing
only what was missing. `--compare-to` pairs runs per document.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import scipy.stats
import yaml

from conserve_bench.ci import ExitCode
from conserve_bench.ci.suite import load_configs
from conserve_bench.ci.report import to_junit
from conserve_bench.ci.nightly import CIOptions, Stopper, run_ci
from conserve_bench.jobs.lifecycle import job_results, write_results_file
from conserve_bench.store import Store

pytestmark = pytest.mark.engine

TASKS = ("mmlu_local_anatomy", "mmlu_local_marketing")
LIMIT = 20
MAX_INFLIGHT = 8


def write_config(path, data_dir, limit=LIMIT, tasks=TASKS, metrics=None):
    doc = {"model": "smollm2-135m", "data_dir": data_dir, "limit": limit, "num_fewshot": 0,
           "tasks": {t: {"metrics": metrics or ["acc"]} for t in tasks}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, engine, data_dir):
    """A finished run (key "base") whose scores became its config's baselines."""
    tmp = tmp_path_factory.mktemp("ci")
    db = f"sqlite:///{tmp / 'ci.db'}"
    config = write_config(tmp / "nightly.yaml", data_dir)
    options = CIOptions(run_key="base", write_baseline=True, output_dir=str(tmp / "results"), db_url=db,
                        max_inflight=MAX_INFLIGHT)
    report = run_ci(load_configs([str(config)], needs_baselines=False), options, engine=engine)
    assert (report.status, report.exit_code) == ("baseline written", ExitCode.PASS), report
    assert report.notes[-1] == f"baselines written to {config}"
    return tmp, db, config, report


def test_write_baseline_records_scores_and_provenance(baseline_run, engine):
    tmp, db, config, report = baseline_run
    (job,) = report.jobs
    written = yaml.safe_load(config.read_text())
    results = job_results(Store(db), job["id"])
    for task in TASKS:
        entry = written["tasks"][task]
        acc = entry["metrics"]["acc"]
        assert acc["baseline"] == pytest.approx(results["results"][task]["acc,none"], abs=1e-6)
        assert acc["n"] == LIMIT and acc["stderr"] == pytest.approx(results["results"][task]["acc_stderr,none"], abs=1e-6)
        assert acc["atol"] == pytest.approx(2 * acc["stderr"], abs=1e-4)
        assert entry["task_hash"] == results["task_hashes"][task] and len(entry["task_hash"]) == 64
    provenance = written["provenance"]
    assert provenance["model_fingerprint"] == engine.fingerprint
    assert engine.fingerprint.startswith(f"smollm2-135m|float32|{engine.max_model_len}|w=")
    assert provenance["lm_eval"] == "0.4.13" and provenance["conserve_bench"] and provenance["jobs"] == [job["id"]]
    assert (tmp / "results" / f"{job['id']}.json").is_file()
    table = (tmp / "results" / f"{job['id']}.samples.jsonl").read_text().splitlines()
    assert len(table) == 2 * LIMIT and set(json.loads(table[0])) == {"task", "doc_id", "acc,none"}


def set_baseline(config, task, value, **tolerance):
    doc = yaml.safe_load(config.read_text())
    acc = doc["tasks"][task]["metrics"]["acc"]
    acc.pop("atol")
    acc.update(baseline=value, **tolerance)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_cli_pass_regression_and_stale_on_the_finished_run(baseline_run, tmp_path, run_cli, monkeypatch):
    from junitparser import Failure, JUnitXml

    base, db, config, report = baseline_run
    measured = {r.task: r.measured for r in report.rows}
    runs_before = Store(db).run_counts(report.jobs[0]["id"])
    common = ["--db", db, "--run-key", "base", "--output", tmp_path / "results"]
    monkeypatch.setenv("GITHUB_SHA", "0123abc")  # what Actions sets; the step summary is a flag here
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)

    code, stdout, stderr = run_cli("ci", config, *common, "--json")
    assert code == ExitCode.PASS, stderr
    assert {r["verdict"] for r in json.loads(stdout)["rows"]} == {"pass"}

    gated = tmp_path / "gated.yaml"
    gated.write_text(config.read_text())
    set_baseline(gated, "mmlu_local_anatomy", measured["mmlu_local_anatomy"] + 0.3, atol=0.05)  # injected
    set_baseline(gated, "mmlu_local_marketing", measured["mmlu_local_marketing"] - 0.3, atol=0.05)  # stale
    summary, junit = tmp_path / "summary.md", tmp_path / "junit.xml"
    code, stdout, stderr = run_cli("ci", gated, *common, "--junit", junit, "--summary", summary, "--json")
    assert code == ExitCode.REGRESSION, stderr
    rows = {r["task"]: r for r in json.loads(stdout)["rows"]}
    assert rows["mmlu_local_anatomy"]["verdict"] == "fail" and rows["mmlu_local_marketing"]["verdict"] == "stale"
    threshold = measured["mmlu_local_anatomy"] + 0.25
    assert rows["mmlu_local_anatomy"]["threshold"] == pytest.approx(threshold)

    suite = next(iter(JUnitXml.fromfile(str(junit))))
    cases = {c.classname: c for c in suite}
    (failure,) = cases["mmlu_local_anatomy"].result
    assert isinstance(failure, Failure)
    assert failure.message == f"measured {measured['mmlu_local_anatomy']:.4f} < threshold {threshold:.4f}"
    assert cases["mmlu_local_marketing"].is_passed
    assert {p.name: p.value for p in suite.properties()}["commit"] == "0123abc"

    markdown = summary.read_text()
    assert markdown.startswith("## conserve-bench ci: REGRESSION")
    assert (f"| mmlu_local_anatomy | acc,none | {measured['mmlu_local_anatomy'] + 0.3:.4f} | "
            f"{measured['mmlu_local_anatomy']:.4f} | {threshold:.4f} |") in markdown
    assert "| **fail** |" in markdown and "| **stale** |" in markdown
    assert Store(db).run_counts(report.jobs[0]["id"]) == runs_before  # nothing computed again


def test_deadline_then_the_same_run_key_computes_only_what_was_missing(tmp_path, engine, data_dir):
    db = f"sqlite:///{tmp_path / 'ci.db'}"
    store = Store(db)
    metrics = {"acc": {"baseline": 0.25, "atol": 1.0}}
    configs = load_configs([str(write_config(tmp_path / "c.yaml", data_dir, tasks=("mmlu_local_astronomy",),
                                             metrics=metrics))])
    options = CIOptions(run_key="nightly", db_url=db, output_dir=str(tmp_path / "results"),
                        max_inflight=MAX_INFLIGHT, deadline=1000.0)

    def clock() -> float:  # the deadline passes once a third of the job is committed
        jobs = store.list_jobs()
        return 1e12 if jobs and jobs[0].num_total and jobs[0].num_done >= jobs[0].num_total // 3 else 0.0

    stopped = run_ci(configs, options, engine=engine, stopper=Stopper(options.deadline, clock))
    assert (stopped.status, stopped.exit_code) == ("incomplete", ExitCode.INCOMPLETE)
    assert stopped.message.startswith("deadline reached: 0 of 1 jobs finished; run again with the same --run-key")
    assert {r.verdict for r in stopped.rows} == {"incomplete"}
    assert 'type="incomplete"' in to_junit(stopped)
    (job,) = store.list_jobs()
    assert job.state == "queued" and 0 < job.num_done < job.num_total and stopped.jobs[0]["done"] == job.num_done
    assert store.item_states(job.id).get("running", 0) == 0  # claimed items were given back
    done_before = {i["key"] for i in store.job_items(job.id) if i["state"] == "done"}

    resumed = run_ci(configs, CIOptions(run_key="nightly", db_url=db, output_dir=str(tmp_path / "results"),
                                        max_inflight=MAX_INFLIGHT), engine=engine)
    assert resumed.exit_code == ExitCode.PASS and [j["id"] for j in resumed.jobs] == [job.id]
    assert len(store.list_jobs()) == 1 and store.get_job(job.id).state == "done"
    runs = store.run_counts(job.id)
    assert all(runs[k] == 1 for k in done_before)  # nothing finished was computed again
    assert all(n in (1, 2) for n in runs.values())
    assert sum(n == 2 for n in runs.values()) <= MAX_INFLIGHT  # only what was in flight at the stop


def test_compare_to_itself_and_to_a_run_with_flipped_answers(baseline_run, engine, tmp_path):
    base, db, config, report = baseline_run
    job_id = report.jobs[0]["id"]
    configs = load_configs([str(config)])
    options = CIOptions(run_key="base", db_url=db, output_dir=None, compare_to=job_id)
    itself = run_ci(configs, options, engine=engine)
    assert [(r.delta, r.p, r.test) for r in itself.rows] == [(0.0, 1.0, "mcnemar")] * len(TASKS)

    # An earlier run that answered every question right that this one got wrong on anatomy.
    earlier = job_results(Store(db), job_id)
    anatomy = earlier["per_sample"]["mmlu_local_anatomy"]
    num_wrong = anatomy["acc,none"].count(0)
    anatomy["acc,none"] = [1] * len(anatomy["acc,none"])
    path = write_results_file(earlier, tmp_path / "earlier.json")
    compared = run_ci(configs, CIOptions(run_key="base", db_url=db, output_dir=None, compare_to=str(path)),
                      engine=engine)
    rows = {r.task: r for r in compared.rows}
    assert rows["mmlu_local_anatomy"].delta == pytest.approx(-num_wrong / LIMIT)
    assert rows["mmlu_local_anatomy"].p == scipy.stats.binomtest(0, num_wrong).pvalue < 0.05
    assert rows["mmlu_local_marketing"].p == 1.0
    assert compared.exit_code == ExitCode.PASS  # a comparison reports; the baseline gates


def test_sigterm_gives_claimed_items_back_and_reports_incomplete(tmp_path, engine, data_dir):
    """What CI sends on cancel, delivered to this process while the job runs."""
    db = f"sqlite:///{tmp_path / 'ci.db'}"
    store = Store(db)
    configs = load_configs([str(write_config(tmp_path / "c.yaml", data_dir, limit=12,
                                             tasks=("mmlu_local_high_school_geography",),
                                             metrics={"acc": {"baseline": 0.25, "atol": 1.0}}))])

    def send_sigterm_at_a_third():
        deadline = time.time() + 300
        while time.time() < deadline:
            jobs = store.list_jobs()
            if jobs and jobs[0].num_total and jobs[0].num_done >= jobs[0].num_total // 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    stopper = Stopper()
    killer = threading.Thread(target=send_sigterm_at_a_third)
    with stopper.handling_signals():
        killer.start()
        report = run_ci(configs, CIOptions(run_key="cancelled", db_url=db, output_dir=None,
                                           max_inflight=MAX_INFLIGHT), engine=engine, stopper=stopper)
    killer.join()
    assert (report.status, report.exit_code) == ("incomplete", ExitCode.INCOMPLETE)
    assert report.message.startswith("interrupted by SIGTERM: 0 of 1 jobs finished")
    (job,) = store.list_jobs()
    assert job.state == "queued" and job.num_done < job.num_total
    assert store.item_states(job.id).get("running", 0) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
