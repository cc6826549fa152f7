"""A real kill: SIGKILL `submit` at about half progress, `resume`, compare with a clean run.

No item is lost, at most the in-flight window is computed twice, and the final scores equal
those of an uninterrupted run (computed on the session engine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conserve_bench.config import JobSpec
from conserve_bench.jobs.lifecycle import run_job, submit_job, task_metrics
from conserve_bench.store import Store

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TASKS = "mmlu_high_school_geography,mmlu_anatomy"
LIMIT = 40
MAX_INFLIGHT = 16


def cli(*args):
    return [sys.executable, "-m", "conserve_bench.cli", *args]


def wait_for_half(store: Store, proc, timeout_s=600) -> tuple[str, int]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        found = store.list_jobs()
        if found and found[0].num_total and found[0].num_done >= found[0].num_total // 2:
            return found[0].id, found[0].num_done
        time.sleep(0.05)
    raise AssertionError("submit never reached half progress")


def test_sigkill_then_resume_loses_nothing(tmp_path, engine, data_dir):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    store = Store(url)
    submit = subprocess.Popen(
        cli("submit", TASKS, "--limit", str(LIMIT), "--data-dir", data_dir, "--db", url,
            "--max-inflight", str(MAX_INFLIGHT), "--output", str(tmp_path), "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        job_id, done_at_kill = wait_for_half(store, submit)
    finally:
        os.killpg(submit.pid, signal.SIGKILL)  # the CLI and vLLM's engine processes
        submit.wait()
    job = store.get_job(job_id)
    assert job.state == "running" and 0 < job.num_done < job.num_total

    resumed = subprocess.run(cli("resume", job_id, "--db", url, "--output", str(tmp_path), "--json"),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    job = store.get_job(job_id)
    assert job.state == "done" and job.num_done == job.num_total == 2 * LIMIT * 4
    runs = store.run_counts(job_id)
    assert all(n >= 1 for n in runs.values())
    assert sum(n - 1 for n in runs.values()) <= MAX_INFLIGHT

    clean_store = Store(f"sqlite:///{tmp_path / 'clean.db'}")
    clean = submit_job(clean_store, JobSpec(tasks=tuple(TASKS.split(",")), limit=LIMIT, data_dir=data_dir))
    expected = task_metrics(run_job(clean_store, clean.id, engine, output_dir=None))
    assert json.loads(resumed.stdout)["results"] == expected
    assert task_metrics(json.loads((tmp_path / f"{job_id}.json").read_text())) == expected
