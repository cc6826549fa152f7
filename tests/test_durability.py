"""A real kill: SIGKILL `submit` (the CLI and vLLM's engine processes) at about half progress,
then `resume`; compare with an uninterrupted run.

No item is lost, at most the in-flight window is computed twice, and the final scores equal
those of an uninterrupted run. `resume` and the reference run in this process, on the session
engine; the killed `submit` starts its own. tests/test_runner.py proves the runner's window
and requeue on the fake engine, tests/test_server.py kills `serve`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conserve_bench.config import JobSpec
from conserve_bench.jobs.lifecycle import run_job, submit_job, task_metrics
from conserve_bench.store import Store

from .conftest import cli_command, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TASKS = "mmlu_high_school_geography,mmlu_anatomy"
LIMIT = 20
MAX_INFLIGHT = 16


def test_sigkill_then_resume_loses_nothing(tmp_path, session_engine_for_entry_points, data_dir, capsys):
    from conserve_bench import cli

    engine = session_engine_for_entry_points
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    store = Store(url)
    submit = subprocess.Popen(
        cli_command("submit", TASKS, "--limit", str(LIMIT), "--data-dir", data_dir, "--db", url,
                    "--max-inflight", str(MAX_INFLIGHT), "--output", str(tmp_path), "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def half_done():
            assert submit.poll() is None, submit.stderr.read()
            jobs = store.list_jobs()
            return jobs[0] if jobs and jobs[0].num_total and jobs[0].num_done >= jobs[0].num_total // 2 else None

        job_id = wait_for(half_done, "half progress").id
    finally:
        os.killpg(submit.pid, signal.SIGKILL)  # the CLI and vLLM's engine processes
        submit.wait()
    job = store.get_job(job_id)
    assert job.state == "running" and 0 < job.num_done < job.num_total

    capsys.readouterr()
    cli.app(["resume", job_id, "--db", url, "--output", str(tmp_path), "--json"], standalone_mode=False)
    resumed = json.loads(capsys.readouterr().out)
    job = store.get_job(job_id)
    assert job.state == "done" and job.num_done == job.num_total == 2 * LIMIT * 4
    runs = store.run_counts(job_id)
    assert all(n >= 1 for n in runs.values())
    assert sum(n - 1 for n in runs.values()) <= MAX_INFLIGHT

    clean_store = Store(f"sqlite:///{tmp_path / 'clean.db'}")
    clean = submit_job(clean_store, JobSpec(tasks=tuple(TASKS.split(",")), limit=LIMIT, data_dir=data_dir))
    expected = task_metrics(run_job(clean_store, clean.id, engine, output_dir=None))
    assert resumed["results"] == expected
    assert task_metrics(json.loads((tmp_path / f"{job_id}.json").read_text())) == expected
