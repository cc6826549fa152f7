"""`ci` when something is wrong other than the model's scores: a NaN or infinite score, a crash.

A non-finite score is an "invalid" row (a JUnit error) and fails the run with exit 1; it is
never a pass and never becomes a baseline. An unexpected exception exits 3 (infrastructure),
never 1 (a regression), in one line; `--verbose` adds the traceback. The commands run through
the real CLI with a backend that returns canned results, so no engine starts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from conserve_bench.ci import ExitCode
from conserve_bench.ci import nightly
from conserve_bench.ci.suite import CIConfig, MetricCheck, TaskCheck
from conserve_bench.ci.gate import Measured, Verdict, judge, measure
from conserve_bench.ci.report import JobOutcome, build_report, to_junit, to_markdown
from .conftest import json_handler

TASKS = ("t1", "t2")


def results_with(scores: dict[str, float], stderr: float = 0.05) -> dict:
    """lm-eval's results layout for `scores` (task -> acc,none), 20 documents each."""
    return {"results": {t: {"acc,none": v, "acc_stderr,none": stderr} for t, v in scores.items()},
            "n-samples": {t: {"effective": 20} for t in scores},
            "higher_is_better": {t: {"acc": True} for t in scores},
            "conserve": {"job": {"id": "job1"}}}


def check(baseline=0.5, **kw):
    return MetricCheck("acc,none", "acc", baseline=baseline, atol=0.1, **kw)


# -- verdicts and reports ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_score_is_invalid_whatever_the_gate(value):
    for gate in (check(), check(baseline=None), check(wilson=0.95), check(higher_is_better=False)):
        judged = judge(gate, Measured(value, 0.05, 20, True))
        assert judged.verdict == Verdict.INVALID, gate
        assert judged.detail == f"the run reported {value} for acc,none: not a finite number"


def test_a_nan_stderr_is_no_stderr():
    results = results_with({"t1": 0.5}, stderr=math.nan)
    assert measure(results, "t1", "acc,none") == Measured(0.5, None, 20, True)


def test_a_nan_score_is_an_error_row_and_fails_the_report():
    cfg = CIConfig("ci/a.yaml", "m", tuple(TaskCheck(t, metrics=(check(),)) for t in TASKS))
    job = {"id": "job1", "state": "done", "done": 40, "total": 40}
    report = build_report([cfg], [JobOutcome(cfg, TASKS, job, results_with({"t1": math.nan, "t2": 0.5}))])
    invalid, passed = report.rows
    assert (invalid.verdict, passed.verdict) == ("invalid", "pass")
    assert invalid.measured is None and invalid.delta is None and "nan" in invalid.detail
    assert (report.status, report.exit_code) == ("invalid", ExitCode.REGRESSION)
    json.dumps(report.to_dict(), allow_nan=False)  # strict JSON: no NaN anywhere in it
    assert "| t1 | acc,none | 0.5000 | not finite |  |  |  | **invalid** |" in to_markdown(report)
    junit = to_junit(report)
    assert 'errors="1"' in junit and 'failures="0"' in junit and 'type="invalid"' in junit


# -- through the CLI, with canned results -----------------------------------------------------


class CannedBackend:
    """Stands in for the embedded backend: every job is done with `SCORES`."""

    SCORES: dict[str, float] = {}

    def __init__(self, options, engine=None):
        pass

    def check(self, cfg):
        pass

    def attach(self, p):
        return {"id": "job1", "state": "done", "done": 40, "total": 40, "run_key": p.run_key}

    def run(self, p, stopper, on_progress):
        return results_with(self.SCORES)

    def close(self):
        pass


@pytest.fixture
def canned(monkeypatch):
    monkeypatch.setattr(nightly, "_EmbeddedBackend", CannedBackend)
    return CannedBackend


def write_config(tmp_path, metrics=None):
    doc = {"model": "smollm2-135m", "tasks": {t: {"metrics": metrics or {"acc": {"baseline": 0.5, "atol": 0.1}}}
                                               for t in TASKS}}
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_cli_a_nan_score_fails_the_run_with_an_error_row(canned, run_cli, tmp_path):
    canned.SCORES = {"t1": math.nan, "t2": 0.5}
    junit = tmp_path / "junit.xml"
    code, stdout, stderr = run_cli("ci", write_config(tmp_path), "--output", tmp_path / "results",
                                   "--junit", junit, "--json")
    assert code == ExitCode.REGRESSION, stderr
    report = json.loads(stdout)  # NOTE: Python's json accepts NaN; the report has none
    assert report["status"] == "invalid" and [r["verdict"] for r in report["rows"]] == ["invalid", "pass"]
    assert "NaN" not in stdout
    assert 'type="invalid"' in junit.read_text()


def test_cli_a_nan_score_is_never_written_as_a_baseline(canned, run_cli, tmp_path):
    canned.SCORES = {"t1": 0.5, "t2": math.inf}
    config = write_config(tmp_path, metrics=["acc"])
    before = config.read_text()
    code, stdout, _ = run_cli("ci", config, "--write-baseline", "--output", tmp_path / "results", "--json")
    report = json.loads(stdout)
    assert code == ExitCode.REGRESSION and report["status"] == "invalid"
    assert report["notes"][-1] == "baselines not written: a score is not a finite number"
    assert config.read_text() == before
    canned.SCORES = {"t1": 0.5, "t2": 0.25}  # the same run measured finite scores: written
    assert run_cli("ci", config, "--write-baseline", "--output", tmp_path / "results")[0] == ExitCode.PASS
    assert yaml.safe_load(config.read_text())["tasks"]["t2"]["metrics"]["acc"]["baseline"] == 0.25


def crash(*args, **kwargs):
    raise KeyError("boom")


def test_cli_an_unexpected_exception_exits_3_in_one_line(canned, run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(nightly, "build_report", crash)  # after the run, as a bug in the gate would
    config = write_config(tmp_path)
    code, stdout, stderr = run_cli("ci", config, "--output", tmp_path / "results")
    assert code == ExitCode.INFRASTRUCTURE and stdout == ""
    assert stderr.splitlines() == ["error: KeyError: 'boom' (an internal error; CONSERVE_BENCH_DEBUG=1 or --verbose shows its traceback)"]
    code, _, stderr = run_cli("ci", config, "--output", tmp_path / "results", "--verbose")
    assert code == ExitCode.INFRASTRUCTURE
    assert stderr.startswith("Traceback") and "in crash" in stderr
    assert stderr.splitlines()[-1] == "error: KeyError: 'boom'"


def test_an_unexpected_exception_exits_3_in_a_real_process(tmp_path):
    """The console script's handler as a CI runner sees it: exit status and stderr."""
    config = write_config(tmp_path)
    script = ("import sys; import conserve_bench.ci.nightly as r\n"
              "def crash(*a, **k): raise RuntimeError('engine exploded')\n"
              "r.run_ci = crash\n"
              "from conserve_bench.cli import main\n"
              f"sys.argv = ['conserve-bench', 'ci', {str(config)!r}, '--output', {str(tmp_path / 'r')!r}]\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.INFRASTRUCTURE, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: RuntimeError: engine exploded")
    assert "Traceback" not in done.stderr


def test_a_report_file_in_a_missing_folder_is_refused_before_the_run(canned, run_cli, tmp_path):
    code, _, stderr = run_cli("ci", write_config(tmp_path), "--output", tmp_path / "results",
                              "--junit", tmp_path / "no" / "junit.xml")
    assert code == ExitCode.USAGE and "'--junit'" in stderr and "is not a folder" in stderr
    assert not (tmp_path / "results").exists()


# -- on a server whose store goes out -----------------------------------------------------------

STORE_OUT = {"error": {"type": "StoreUnavailableError",
                       "message": "database postgresql://ci:***@db.internal/jobs unreachable for 30 s"}}


def store_out_server():
    """A loopback HTTP server answering every request 503, as `serve` does while its store is out."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), json_handler(503, STORE_OUT))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_cli_a_server_whose_store_stays_out_is_infrastructure(run_cli, tmp_path):
    server = store_out_server()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, stdout, stderr = run_cli("ci", write_config(tmp_path), "--server", url, "--server-wait", "0.6",
                                       "--output", tmp_path / "results")
    finally:
        server.shutdown()
        server.server_close()
    assert code == ExitCode.INFRASTRUCTURE and stdout == ""
    (line,) = stderr.splitlines()
    assert line.startswith(f"error: {url} answered 503: database <server URL> unreachable for 30 s")
    assert "db.internal" not in line


class FakeServer:
    """The job API of a `serve` whose store is out for the first `num_outages` status polls."""

    def __init__(self, num_outages: int):
        self.num_outages, self.num_polls = num_outages, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "smollm2-135m"}]})
        if request.method == "POST" and path == "/v1/jobs":
            return httpx.Response(201, json={"id": "job1", "state": "queued", "done": 0, "total": 40,
                                             "run_key": json.loads(request.content)["run_key"]})
        if path == "/v1/jobs/job1/results":
            return httpx.Response(200, json=results_with({"t1": 0.5, "t2": 0.55}))
        self.num_polls += 1
        if self.num_polls <= self.num_outages:
            return httpx.Response(503, json=STORE_OUT)
        return httpx.Response(200, json={"id": "job1", "state": "done", "done": 40, "total": 40, "error": None})


@pytest.fixture
def fake_server(monkeypatch):
    """`ci --server` talks to a `FakeServer` (set `.handler`); task names are not looked up."""
    from conserve_bench.jobs import taskspec
    from conserve_bench.serve import client

    holder = type("Holder", (), {"handler": None})()
    real = client.JobClient
    monkeypatch.setattr(client, "JobClient", lambda *a, **k: real(
        *a, **k, transport=httpx.MockTransport(lambda request: holder.handler(request))))
    monkeypatch.setattr(nightly, "check_tasks_of", lambda cfg, manager, **kw: None)
    monkeypatch.setattr(taskspec, "task_manager", lambda data_dir=None: None)
    return holder


def ci_options(tmp_path, **kw):
    return nightly.CIOptions(run_key="nightly", server="http://serve.test", output_dir=str(tmp_path / "r"), **kw)


def test_ci_on_a_server_waits_through_a_store_outage_and_passes(fake_server, tmp_path):
    from conserve_bench.ci.suite import load_configs

    fake_server.handler = FakeServer(num_outages=3)
    report = nightly.run_ci(load_configs([str(write_config(tmp_path))]), ci_options(tmp_path, server_wait_s=30))
    assert (report.status, report.exit_code) == ("pass", ExitCode.PASS), report.message
    assert fake_server.handler.num_polls == 4


def test_ci_a_deadline_during_a_server_outage_is_incomplete_not_infrastructure(fake_server, tmp_path):
    from conserve_bench.ci.suite import load_configs

    fake_server.handler = FakeServer(num_outages=10**6)
    started = time.monotonic()
    stopper = nightly.Stopper(deadline=1.0, clock=lambda: 0.0 if time.monotonic() - started < 1 else 10.0)
    report = nightly.run_ci(load_configs([str(write_config(tmp_path))]), ci_options(tmp_path), stopper=stopper)
    assert (report.status, report.exit_code) == ("incomplete", ExitCode.INCOMPLETE), report.message
    assert report.message.startswith("deadline reached: 0 of 1 jobs finished")
    assert time.monotonic() - started < 5  # not the 300 s a server is waited for
