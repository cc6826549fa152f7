"""A real kill: SIGKILL `submit` (the CLI and the vLLM engine in it) while its job's long
generations are half done, then `resume`; compare with an uninterrupted run.

The questions committed before the kill are never computed again, each generation continues
from its partial (only the rest is generated), and the scores and texts are those of an
uninterrupted run. `resume` and the reference run in this process, on the session engine;
the killed `submit` starts its own. tests/test_runner.py proves the runner's in-flight window
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

from .conftest import TEST_TASKS, cli_command, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# NOTE: lm-eval hands over requests by kind in task order: the questions first
TASKS = ("mmlu_high_school_geography", "mmlu_anatomy", str(TEST_TASKS / "conserve_tiny_long.yaml"))
LIMIT = 10
NUM_QUESTIONS = 2 * LIMIT * 4  # one loglikelihood item per choice
GENERATED_TOKENS = 4 * 256  # conserve_tiny_long's 4 openings never meet its stop string
MAX_INFLIGHT = 16


def test_sigkill_then_resume_loses_nothing_and_continues_every_generation(
        tmp_path, session_engine_for_entry_points, data_dir, capsys):
    from conserve_bench import cli

    engine = session_engine_for_entry_points
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    store = Store(url)
    submit = subprocess.Popen(
        cli_command("submit", ",".join(TASKS), "--limit", str(LIMIT), "--data-dir", data_dir,
                    "--db", url, "--max-inflight", str(MAX_INFLIGHT), "--partial-tokens", "8",
                    "--output", str(tmp_path), "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def half_generated():
            assert submit.poll() is None, submit.stderr.read()
            jobs = store.list_jobs()
            return jobs[0] if jobs and jobs[0].num_partial_tokens >= GENERATED_TOKENS // 2 else None

        job_id = wait_for(half_generated, "half the tokens saved").id
    finally:
        os.killpg(submit.pid, signal.SIGKILL)  # the CLI, with vLLM in it
        submit.wait()
    killed = store.get_job(job_id)
    assert killed.state == "running" and killed.num_partial_items == 4
    assert (killed.num_done, killed.num_total) == (NUM_QUESTIONS, NUM_QUESTIONS + 4)
    status = json.loads(subprocess.run(cli_command("status", job_id, "--db", url, "--json"),
                                       capture_output=True, text=True, check=True).stdout)
    assert (status["partial_items"], status["partial_tokens"]) == (4, killed.num_partial_tokens)

    capsys.readouterr()
    cli.app(["resume", job_id, "--db", url, "--output", str(tmp_path), "--json"], standalone_mode=False)
    resumed = json.loads(capsys.readouterr().out)
    job = store.get_job(job_id)
    assert job.state == "done" and job.num_done == job.num_total and job.num_partial_tokens == 0
    runs = store.run_counts(job_id)
    kinds = {i["key"]: i["kind"] for i in store.job_items(job_id)}
    assert all(n == 1 for key, n in runs.items() if kinds[key] == "loglikelihood")  # committed
    assert all(n == 2 for key, n in runs.items() if kinds[key] == "generate_until")
    written = json.loads((tmp_path / f"{job_id}.json").read_text())
    assert written == resumed  # `--json` prints the results file's object
    assert resumed["conserve"]["resumes"]["num_items"] == resumed["conserve"]["resumes"]["num_resumes"] == 4
    assert resumed["conserve"]["resumes"]["num_reused_tokens"] == killed.num_partial_tokens
    assert written["conserve"]["num_generated_tokens"] == GENERATED_TOKENS - killed.num_partial_tokens

    clean_store = Store(f"sqlite:///{tmp_path / 'clean.db'}")
    clean = submit_job(clean_store, JobSpec(tasks=TASKS, limit=LIMIT, data_dir=data_dir))
    reference = run_job(clean_store, clean.id, engine, output_dir=None)
    assert reference["conserve"]["num_generated_tokens"] == GENERATED_TOKENS
    assert task_metrics(resumed) == task_metrics(reference)
    assert task_metrics(written) == task_metrics(reference)
    for ours, theirs in zip(store.job_items(job_id), clean_store.job_items(clean.id), strict=True):
        assert same_result(ours["result"], theirs["result"]), (ours, theirs)  # texts too


def same_result(ours, theirs) -> bool:
    """The same text, or the same loglikelihood and `is_greedy`. NOTE: two engines batch the
    same prompt with different neighbours, and a CPU GEMM on 2 threads splits its work by the
    batch's shape: the same loglikelihood differs in its sixth digit."""
    if isinstance(ours, list):
        return abs(ours[0] - theirs[0]) < 1e-4 and ours[1] == theirs[1]
    return ours == theirs
