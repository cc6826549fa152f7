"""The CLI on bad input: one line on stderr, non-zero exit, no traceback, nothing lost."""

from __future__ import annotations

import json

import pytest

from conserve_bench.config import JobSpec
from conserve_bench.store import Store, WorkItem

from .conftest import cli


@pytest.fixture
def db(tmp_path):
    """A store with one half-done job, to prove bad commands leave it untouched."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = Store(url)
    job = store.create_job(JobSpec(tasks=("mmlu_anatomy",), limit=1))
    store.add_items(job.id, [WorkItem(f"k{i}", "loglikelihood", {"i": i}) for i in range(4)])
    store.claim_items(job.id, "x", 2)
    store.complete_items("x", {"k0": [-1.0, True], "k1": [-2.0, False]})
    return url, job.id


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("args, words", [
    (["submit", "mmlu_nonsense"], ["unknown task", "mmlu_nonsense"]),
    (["submit", "mmlu_anatomy", "--data-dir", "/no/such/dir"], ["/no/such/dir"]),
    (["submit", "mmlu_anatomy", "--model", "/no/such/model"], ["/no/such/model"]),
    (["status", "feedbeef"], ["feedbeef"]),
    (["resume", "feedbeef"], ["feedbeef"]),
    (["results", "feedbeef"], ["feedbeef"]),
    (["cancel", "feedbeef"], ["feedbeef"]),
])
def test_bad_input_is_one_line_and_keeps_progress(db, data_dir, args, words):
    url, job_id = db
    if args[0] == "submit" and "--data-dir" not in args:
        args = [*args, "--data-dir", data_dir]
    assert_one_line_error(cli(*args, "--db", url), *words)
    store = Store(url)
    assert store.item_states(job_id) == {"done": 2, "pending": 2}
    assert len(store.list_jobs()) == 1


@pytest.mark.parametrize("command", [
    ["submit", "mmlu_anatomy"], ["resume", "JOB"], ["resume", "JOB", "--verbose"],
    ["profile", "--quick"], ["serve"], ["ci", "ci"], ["bench", "--trace", "trace.csv"]],
    ids=lambda command: "-".join(arg.strip("-") for arg in command[:3]))
def test_an_output_that_cannot_hold_results_or_logs_is_refused_before_anything_runs(
        db, tmp_path, run_cli, command):
    """`--output` inside a file: every command that will write there says so before it records
    a job or starts an engine (with --verbose, which writes no log, too); the store is as it
    was."""
    url, job_id = db
    afile = tmp_path / "a-file"
    afile.write_text("")
    args = [job_id if arg == "JOB" else arg for arg in command]
    code, _, err = run_cli(*args, "--db", url, "--output", str(afile / "results"))
    assert code == 2 and err.splitlines() == [
        f"error: Invalid value for '--output': {afile} is a file, not a folder"]
    store = Store(url)
    assert [job.id for job in store.list_jobs()] == [job_id]
    assert store.item_states(job_id) == {"done": 2, "pending": 2}
    assert store.get_job(job_id).state == "queued"


def test_a_log_that_cannot_be_opened_is_one_line_and_keeps_progress(db, tmp_path):
    """The folder is fine but its `<job-id>.log` is a folder: `resume` stops before its engine
    starts, with one line naming the log; the job is as it was."""
    url, job_id = db
    (tmp_path / f"{job_id}.log").mkdir()
    assert_one_line_error(cli("resume", job_id, "--db", url, "--output", str(tmp_path)),
                          "cannot write the log", f"{tmp_path}/{job_id}.log")
    store = Store(url)
    assert store.item_states(job_id) == {"done": 2, "pending": 2}
    assert store.get_job(job_id).state == "queued"


def test_an_output_a_command_will_not_write_is_not_checked(db, tmp_path, run_cli):
    """`submit --no-wait` only records the job (the replicas write its results): a read-only
    working directory, or a file named like --output, does not stop it."""
    url, job_id = db
    (afile := tmp_path / "a-file").write_text("")
    code, printed, err = run_cli("submit", "mmlu_anatomy", "--no-wait", "--json", "--db", url,
                                 "--output", str(afile / "results"))
    assert code == 0, err
    assert Store(url).get_job(json.loads(printed)["id"]).state == "queued"


def test_resume_of_an_lm_eval_runs_job_says_why_before_any_engine_starts(tmp_path):
    """Its requests are added by the lm-eval process as it goes: only a rerun there can finish
    it. Refused before vLLM starts (no engine could run it), its finished items kept."""
    store = Store(f"sqlite:///{tmp_path / 'cli.db'}")
    job = store.create_job(JobSpec(tasks=("lm-eval",), source="session", fingerprint="m|float32|8192"),
                           work=[WorkItem(f"k{i}", "loglikelihood", {"i": i}) for i in range(2)])
    store.claim_items(job.id, "x", 1)
    store.complete_items("x", {"k0": [-1.0, True]})
    refused = cli("resume", job.id, "--db", store.url, "--output", str(tmp_path / "results"))
    assert_one_line_error(refused, job.id, "lm-eval run", "rerun it there")
    assert not (tmp_path / "results").exists()  # refused before the run's log, and its engine
    assert store.item_states(job.id) == {"done": 1, "pending": 1} and store.get_job_state(job.id) == "queued"


@pytest.mark.parametrize("args, words", [
    (["submit", "mmlu_anatomy", "--limit", "0"], ["--limit"]),
    (["status"], ["job_id"]),
    (["jobs", "--no-such-flag"], ["--no-such-flag"]),
    (["submit", "mmlu_anatomy", "--server", "http://127.0.0.1:9", "--output", "x", "--verbose"],
     ["--server", "its own settings", "--output, --verbose"]),
    (["serve", "--no-profile"], ["conserve policy", "--no-profile"]),
    (["serve", "--quantum-ms", "-5"], ["preemption quantum", "-5 ms"]),
    (["serve", "--slo-margin", "1.5"], ["SLO margin", "1.5"]),
    (["serve", "--max-slowdown", "0.3", "--tbt-slo-ms", "100"], ["--max-slowdown", "SLO"]),
    (["serve", "--layer-preemption", "maybe"], ["--layer-preemption", "on or off"]),
    (["serve", "--layer-preemption", "off", "--quantum-ms", "0"], ["preemption quantum", "> 0"]),
    (["serve", "--policy", "priority", "--layer-preemption", "on"], ["--policy conserve"]),
    (["serve", "--lease-s", "10", "--heartbeat-s", "6"], ["--heartbeat-s", "half the lease"]),
    (["serve", "--max-attempts", "0"], ["--max-attempts"]),
    (["serve", "--policy", "priority", "--kv-checkpoint-gib", "2"], ["--kv-checkpoint-gib", "--policy conserve"]),
    (["serve", "--include-path", "no-such-folder"], ["--include-path", "is not a folder"]),
    (["serve", "--data-root", "no-such-folder"], ["--data-root", "is not a folder"]),
])
def test_usage_errors_are_one_line(args, words):
    assert_one_line_error(cli(*args), *words)


def test_malformed_db_url():
    assert_one_line_error(cli("jobs", "--db", "nonsense://"), "nonsense")
    assert_one_line_error(cli("jobs", "--db", "not a url"), "not a url")


def test_status_and_jobs_json(db):
    url, job_id = db
    status = json.loads(cli("status", job_id, "--db", url, "--json").stdout)
    assert {k: status[k] for k in ("id", "state", "done", "total")} == {
        "id": job_id, "state": "queued", "done": 2, "total": 4}
    listed = json.loads(cli("jobs", "--db", url, "--json").stdout)
    assert [j["id"] for j in listed["jobs"]] == [job_id] and listed["num_jobs"] == 1


def test_jobs_lists_the_newest_and_says_when_there_are_more(db, run_cli):
    url, first = db
    store = Store(url)
    newer = [store.create_job(JobSpec(tasks=("mmlu_anatomy",), limit=n)).id for n in (2, 3)]
    code, printed, _ = run_cli("jobs", "--db", url, "--limit", "2", "--json")
    listed = json.loads(printed)
    assert code == 0 and [j["id"] for j in listed["jobs"]] == newer[::-1] and listed["num_jobs"] == 3
    assert "the newest 2 of 3 jobs; --limit 0 lists all" in run_cli("jobs", "--db", url, "--limit", "2")[1]
    every = json.loads(run_cli("jobs", "--db", url, "--limit", "0", "--json")[1])["jobs"]
    assert [j["id"] for j in every] == [*newer[::-1], first]


def test_results_of_unfinished_job_is_an_error(db):
    url, job_id = db
    assert_one_line_error(cli("results", job_id, "--db", url), "no results yet")


def test_cancel_keeps_finished_items(db):
    url, job_id = db
    out = json.loads(cli("cancel", job_id, "--db", url, "--json").stdout)
    assert out["state"] == "cancelled" and out["done"] == 2
    assert_one_line_error(cli("resume", job_id, "--db", url), "cancelled")


# `submit` on the fake engine, in a process of its own: one item per 0.1 s step.
FAKE_SUBMIT = """
import sys
from conserve_bench.engine.fake import FakeEngine
from conserve_bench.engine import local

class Engine(FakeEngine):
    max_model_len = 8192
    def __enter__(self): return self
    def __exit__(self, *exc): pass

local.start_engine = lambda model, **overrides: Engine(items_per_step=1, step_s=0.1)
from conserve_bench.cli import main
sys.argv = ["conserve-bench", *sys.argv[1:]]
main()
"""


def test_sigterm_stops_submit_as_ctrl_c_does_keeping_progress_and_run_time(tmp_path, data_dir):
    import signal
    import subprocess
    import sys

    from .conftest import wait_for

    url = f"sqlite:///{tmp_path / 'term.db'}"
    store = Store(url)
    # NOTE: 30 items, signalled after 8: on a loaded host the job must not end before the signal
    proc = subprocess.Popen([sys.executable, "-c", FAKE_SUBMIT, "submit", "mmlu_anatomy", "--limit", "30",
                             "--data-dir", data_dir, "--db", url, "--output", str(tmp_path),
                             "--max-inflight", "4"], stderr=subprocess.PIPE, text=True)
    try:
        job = wait_for(lambda: next((j for j in store.list_jobs() if j.num_done >= 8), None),
                       "8 items done", timeout_s=120)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == (f"interrupted: job {job.id}'s items in flight went back to pending; "
                                            f"`conserve-bench resume {job.id}` continues it")
    stopped = store.get_job(job.id)
    assert stopped.state == "queued" and stopped.run_s > 0  # not left running, its time counted
    assert 8 <= stopped.num_done < stopped.num_total
    assert "running" not in store.item_states(job.id)


def test_a_crash_in_any_command_is_one_line_and_exit_3_and_the_store_survives_it(tmp_path):
    """An unexpected error (here a crash injected inside a store migration) in a command without
    a log: one line on stderr, exit 3, no traceback unless asked; the same command then opens
    the store, migrated whole (the crashed migration left nothing half done)."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    crashed = cli("jobs", "--db", url, env={"CONSERVE_BENCH_FAULTS": "migration.after_ddl:1"})
    assert crashed.returncode == 3
    assert crashed.stderr.strip().splitlines() == [
        "error: InjectedFault: injected fault at migration.after_ddl (an internal error; "
        "CONSERVE_BENCH_DEBUG=1 or --verbose shows its traceback)"]
    debug = cli("jobs", "--db", url, env={"CONSERVE_BENCH_FAULTS": "migration.after_ddl:1",
                                          "CONSERVE_BENCH_DEBUG": "1"})
    assert debug.returncode == 3 and "Traceback" in debug.stderr
    again = cli("jobs", "--db", url)
    assert again.returncode == 0, again.stderr


def test_submit_names_tasks_of_an_include_path_as_lm_eval_does(tmp_path):
    """`--include-path DIR` (lm-eval's `--include_path`) makes DIR's tasks nameable on the
    command line too, as on `serve`; without it the name is unknown, in one line."""
    from .conftest import TEST_TASKS

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    unknown = cli("submit", "conserve_tiny_gen", "--db", url, "--no-wait")
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        "error: unknown task 'conserve_tiny_gen'"]
    known = cli("submit", "conserve_tiny_gen", "--include-path", str(TEST_TASKS), "--db", url, "--no-wait")
    assert known.returncode == 0 and "queued: conserve_tiny_gen" in known.stdout, known.stderr
