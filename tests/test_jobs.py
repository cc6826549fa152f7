"""`run_job`'s state changes on the fake engine: queued -> running -> done, failed, cancelled,
queued again after a drain; what each leaves in the store; lm-eval's tasks over the fake."""

from __future__ import annotations

import json
import math
import re

import pytest

from conserve_bench.config import JobSpec, RunConfig
from conserve_bench.engine.fake import FAKE_FINGERPRINT, FakeEngine, FakeEngineError, fake_result
from conserve_bench.errors import JobStateError
from conserve_bench.jobs.lifecycle import (cancel_job, job_results, run_job, submit_job,
                                           submit_requests)
from conserve_bench.jobs.runner import Stopped

from .conftest import TEST_TASKS
from .tasks.tiny import TEXTS

BOTH_DIALECTS = True
REQUESTS = [("loglikelihood", [f"Q{i}:", " A"]) for i in range(24)]
SMALL_WINDOW = RunConfig(max_inflight=4)  # commits (and looks at stop requests) every 2 items


def requests_job(store, requests=REQUESTS):
    job, _ = submit_requests(store, requests, FAKE_FINGERPRINT, "fake-model")
    return job


def test_a_job_runs_queued_then_running_then_done(store, tmp_path):
    job = requests_job(store)
    states = []
    engine = FakeEngine(on_step=lambda: states.append(store.get_job(job.id).state))
    progress = []
    results = run_job(store, job.id, engine, output_dir=tmp_path,
                      on_progress=lambda done, total, tokens: progress.append((done, total)))
    assert job.state == "queued" and set(states) == {"running"}
    final = store.get_job(job.id)
    assert (final.state, final.num_done, final.num_total) == ("done", 24, 24)
    assert progress[-1] == (24, 24)
    assert results["conserve"]["num_items_computed"] == 24
    assert results["conserve"]["engine"]["fingerprint"] == FAKE_FINGERPRINT
    assert json.loads((tmp_path / f"{job.id}.json").read_text()) == results == job_results(store, job.id)
    with pytest.raises(JobStateError, match="nothing to run"):
        run_job(store, job.id, FakeEngine(), output_dir=None)


def test_a_job_seen_done_always_has_its_results(store, monkeypatch):
    """Another replica's job API may read the job between any two writes of this one."""
    from conserve_bench.store import Store

    job = requests_job(store)
    seen = []
    for name in ("set_job_state", "save_results", "leave_job", "add_run_time"):
        def write(self, *args, _write=getattr(Store, name), **kwargs):
            written = _write(self, *args, **kwargs)
            seen.append((self.get_job(job.id).state, self.get_results(job.id) is not None))
            return written
        monkeypatch.setattr(Store, name, write)
    run_job(store, job.id, FakeEngine(), output_dir=None)
    assert ("done", True) in seen
    assert all(has_results for state, has_results in seen if state == "done"), seen


def test_the_same_requests_again_are_done_at_once(store):
    run_job(store, requests_job(store).id, FakeEngine(), output_dir=None)
    again = requests_job(store)
    assert (again.state, again.num_done) == ("done", 24)


def test_an_engine_failure_fails_the_job_and_keeps_its_finished_items(store):
    job = requests_job(store)
    with pytest.raises(FakeEngineError):
        run_job(store, job.id, FakeEngine(fail_after=8), output_dir=None)
    failed = store.get_job(job.id)
    assert failed.state == "failed" and failed.error.startswith("FakeEngineError: fake engine failed")
    assert "\n" not in failed.error
    assert store.item_states(job.id) == {"done": 8, "pending": 16}
    done = [i["key"] for i in store.job_items(job.id) if i["state"] == "done"]
    run_job(store, job.id, FakeEngine(), output_dir=None)  # a failed job can be resumed
    assert store.get_job(job.id).state == "done"
    assert all(store.run_counts(job.id)[key] == 1 for key in done)


def test_cancelling_a_running_job_stops_it_and_keeps_its_finished_items(store):
    job = requests_job(store)
    engine = FakeEngine(items_per_step=2, on_step=lambda: (
        store.get_job(job.id).num_done >= 4 and store.get_job(job.id).state == "running"
        and cancel_job(store, job.id)))
    with pytest.raises(Stopped):
        run_job(store, job.id, engine, SMALL_WINDOW, output_dir=None)
    cancelled = store.get_job(job.id)
    assert cancelled.state == "cancelled" and 4 <= cancelled.num_done < 24
    assert "running" not in store.item_states(job.id)
    with pytest.raises(JobStateError, match="cancelled"):
        run_job(store, job.id, FakeEngine(), output_dir=None)


def test_a_drained_job_goes_back_to_queued(store):
    job = requests_job(store)
    with pytest.raises(Stopped):
        run_job(store, job.id, FakeEngine(items_per_step=1), SMALL_WINDOW, output_dir=None,
                should_stop=lambda: store.get_job(job.id).num_done >= 12)
    drained = store.get_job(job.id)
    assert drained.state == "queued" and drained.num_done == 12
    assert store.item_states(job.id) == {"done": 12, "pending": 12}


def test_lm_eval_tasks_run_through_the_store(store):
    """A task job: lm-eval builds the requests (generation and rolling loglikelihood here),
    ConserveLM keys them into items, the runner computes them, lm-eval scores the results:
    exactly the results stored, each under its own item (the plumbing; tests/test_engine.py
    checks the real engine's results against lm-eval's `hf`)."""
    tasks = (str(TEST_TASKS / "conserve_tiny_gen.yaml"), str(TEST_TASKS / "conserve_tiny_rolling.yaml"))
    job = submit_job(store, JobSpec(tasks=tasks))
    engine = FakeEngine()
    results = run_job(store, job.id, engine, output_dir=None)
    assert store.get_job(job.id).state == "done"
    assert store.item_states(job.id) == {"done": 10 + 4} and len(engine.submitted) == 14
    assert results["conserve"]["num_items_computed"] == 14
    items = store.job_items(job.id)
    assert all(i["result"] == fake_result(i["key"], i["kind"]) for i in items)
    # lm-eval's word perplexity over the four texts, from the rolling loglikelihoods stored
    rolling = [i["result"] for i in items if i["kind"] == "loglikelihood_rolling"]
    words = sum(len(re.split(r"\s+", text)) for text in TEXTS)
    assert results["results"]["conserve_tiny_rolling"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(rolling) / words))
