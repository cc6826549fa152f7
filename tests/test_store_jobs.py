"""Job-level writes are compare-and-set: a cancel never undoes a done job, results never undo
a cancel, a failed job is requeued with its failed items exactly once; on SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest

from conserve_bench.config import JobSpec, LeaseConfig
from conserve_bench.engine.fake import FakeEngine
from conserve_bench.errors import JobNotFoundError, JobStateError
from conserve_bench.jobs.lifecycle import cancel_job, run_job
from conserve_bench.store import JobState, Store, WorkItem

from .test_jobs import requests_job

BOTH_DIALECTS = True
RESULTS = {"results": {"t": {"acc,none": 1.0}}}


def job_with_items(store, n: int = 3) -> str:
    job = store.create_job(JobSpec(tasks=("t",)))
    store.add_items(job.id, [WorkItem(f"k{i}", "loglikelihood", {"i": i}) for i in range(n)])
    return job.id


def failed_job(store) -> str:
    """A job that failed with its first two items failed for good (one attempt each)."""
    job_id = job_with_items(store)
    once = Store(store.url, LeaseConfig(max_attempts=1))
    once.start_job(job_id, "w")
    claimed = once.claim_items(job_id, "w", 2)
    once.fail_items("w", {w.key: "boom" for w in claimed}, {w.key: w.attempt for w in claimed})
    once.set_job_state(job_id, JobState.FAILED, error="ItemsFailedError: 2 items failed")
    return job_id


def test_cancelling_a_done_or_cancelled_job_is_refused_and_changes_nothing(store):
    done = job_with_items(store)
    assert store.save_results(done, RESULTS)
    with pytest.raises(JobStateError, match="already done"):
        cancel_job(store, done)
    assert store.get_job(done).state == JobState.DONE and store.get_results(done) == RESULTS
    cancelled = job_with_items(store)
    assert cancel_job(store, cancelled).state == JobState.CANCELLED
    with pytest.raises(JobStateError, match="already cancelled"):
        cancel_job(store, cancelled)
    assert store.cancel_job(cancelled) is False
    with pytest.raises(JobNotFoundError):
        store.cancel_job("nope")


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.RUNNING, JobState.FAILED])
def test_an_unfinished_or_failed_job_can_be_cancelled(store, state):
    job_id = job_with_items(store)
    store.set_job_state(job_id, state)
    assert store.cancel_job(job_id) is True
    assert store.get_job_state(job_id) == JobState.CANCELLED


def test_results_saved_after_a_cancel_do_not_overwrite_it(store):
    job_id = job_with_items(store)
    store.start_job(job_id, "w")
    cancel_job(store, job_id)
    assert store.save_results(job_id, RESULTS) is False
    assert store.get_job_state(job_id) == JobState.CANCELLED and store.get_results(job_id) is None


def test_a_run_cancelled_as_it_finishes_stays_cancelled_without_results(store, tmp_path, monkeypatch):
    """The cancel lands after the last item and the run's last cancel check, before its
    results are saved (the run adds its run time in between)."""
    job = requests_job(store)
    add_run_time = store.add_run_time

    def cancel_meanwhile(job_id, run_s):
        add_run_time(job_id, run_s)
        cancel_job(store, job_id)

    monkeypatch.setattr(store, "add_run_time", cancel_meanwhile)
    with pytest.raises(JobStateError, match="cancelled"):
        run_job(store, job.id, FakeEngine(), output_dir=tmp_path)
    assert store.get_job_state(job.id) == JobState.CANCELLED and store.get_results(job.id) is None
    assert not (tmp_path / f"{job.id}.json").exists()
    assert store.item_states(job.id) == {"done": job.num_total}  # kept, for a rerun to reuse


def test_requeueing_a_failed_job_retries_its_failed_items_once(store):
    job_id = failed_job(store)
    assert store.item_states(job_id) == {"failed": 2, "pending": 1}
    assert store.requeue_failed_job(job_id) is True
    job = store.get_job(job_id)
    assert (job.state, job.error, job.num_failed) == (JobState.QUEUED, None, 0)
    assert store.item_states(job_id) == {"pending": 3}
    assert store.item_errors(job_id) == []
    assert store.requeue_failed_job(job_id) is False  # queued now: a second re-post is a no-op


@pytest.mark.parametrize("state", [JobState.CANCELLED, JobState.DONE, JobState.RUNNING])
def test_only_a_failed_job_is_requeued(store, state):
    job_id = failed_job(store)
    store.set_job_state(job_id, state)
    assert store.requeue_failed_job(job_id) is False
    assert store.get_job_state(job_id) == state
    assert store.item_states(job_id) == {"failed": 2, "pending": 1}  # its items untouched


def test_set_job_state_can_be_fenced_by_the_state_it_leaves(store):
    job_id = job_with_items(store)
    assert store.set_job_state(job_id, JobState.RUNNING, only_from=[JobState.QUEUED]) is True
    assert store.set_job_state(job_id, JobState.CANCELLED, only_from=[JobState.QUEUED]) is False
    assert store.get_job_state(job_id) == JobState.RUNNING
