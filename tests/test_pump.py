"""The offline pump on the fake engine: start, run queued jobs, drain on stop, resume on the
next start (what `serve` does around SIGTERM and after a SIGKILL)."""

from __future__ import annotations

import contextlib

import pytest

from conserve_bench.config import RunConfig
from conserve_bench.engine.fake import FAKE_FINGERPRINT, FakeEngine
from conserve_bench.jobs.lifecycle import submit_requests
from conserve_bench.serve.pump import OfflinePump

from .conftest import dead_replica, wait_for

BOTH_DIALECTS = True
WINDOW = RunConfig(max_inflight=4)


def requests_job(store, num: int, label: str = "lm-eval"):
    job, _ = submit_requests(store, [("loglikelihood_rolling", [f"{label} {i}"]) for i in range(num)],
                             FAKE_FINGERPRINT, "fake-model", label)
    return job


def pump(store, engine, progress=None) -> OfflinePump:
    return OfflinePump(store, engine, WINDOW, output_dir=None,
                       on_progress=lambda *a: progress.append(a) if progress is not None else None)


@contextlib.contextmanager
def running(p: OfflinePump):
    p.start()
    try:
        yield p
    finally:
        p.stop()


def wait_done(store, job, timeout_s: float = 30) -> None:
    wait_for(lambda: store.get_job(job.id).state == "done", f"job {job.id}", timeout_s)


def test_a_started_pump_runs_queued_jobs_oldest_first(store):
    first, second = requests_job(store, 6, "a"), requests_job(store, 6, "b")
    engine, progress = FakeEngine(items_per_step=2), []
    with running(pump(store, engine, progress)):
        wait_done(store, second)
    assert store.get_job(first.id).state == "done"
    assert engine.submitted == [i["key"] for j in (first, second) for i in store.job_items(j.id)]
    assert (first.id, 6, 6) in progress and (second.id, 6, 6) in progress


def test_a_pump_leaves_other_models_jobs_and_lm_eval_sessions_alone(store):
    """Another model's requests would be computed by the wrong model and reused under their
    keys as theirs, another model's tasks scored under its name; a session's items are added
    by its own process as it goes. The pump passes them over, for good, and runs the jobs
    behind them."""
    from conserve_bench.config import JobSpec
    from conserve_bench.jobs.lifecycle import run_job
    from conserve_bench.errors import ForeignJobError

    other, _ = submit_requests(store, [("loglikelihood_rolling", ["x"])], "other|float32|2048", "m")
    session = store.create_job(JobSpec(tasks=("lm-eval",), source="session",
                                       fingerprint=FAKE_FINGERPRINT))
    other_tasks = store.create_job(JobSpec(tasks=("mmlu",), model="other-model"))
    mine = requests_job(store, 4)
    engine = FakeEngine()
    serving = OfflinePump(store, engine, WINDOW, output_dir=None, model="fake-model")
    with running(serving):
        wait_done(store, mine)
    assert engine.submitted == [i["key"] for i in store.job_items(mine.id)]
    assert {store.get_job(j.id).state for j in (other, session, other_tasks)} == {"queued"}
    for job, why in ((other, "holds requests for other"), (session, "is an lm-eval run"),
                     (other_tasks, "evaluates other-model, not this engine's fake-model")):
        with pytest.raises(ForeignJobError, match=f"job {job.id} {why}"):  # what `resume` says
            run_job(store, job.id, engine, output_dir=None, model="fake-model")


def test_stop_drains_in_flight_items_to_pending_and_the_next_start_resumes(store):
    job = requests_job(store, 20)
    first = pump(store, FakeEngine(items_per_step=1, stall_after=8))
    first.start()
    wait_for(lambda: store.get_job(job.id).num_done == 8, "the stall")
    assert store.item_states(job.id)["running"] > 0
    first.stop(timeout_s=10)
    drained = store.get_job(job.id)
    assert (drained.state, drained.num_done) == ("queued", 8)
    assert store.item_states(job.id) == {"done": 8, "pending": 12}

    with running(pump(store, FakeEngine())):
        wait_done(store, job)
    runs = store.run_counts(job.id)
    assert sum(n - 1 for n in runs.values()) <= WINDOW.max_inflight  # only what was in flight


def test_a_start_takes_back_a_killed_servers_running_job(store):
    job = requests_job(store, 10)
    store.set_job_state(job.id, "running")
    store.claim_items(job.id, dead_replica(store), 4)  # the killed server's in-flight items
    with running(pump(store, FakeEngine())):
        wait_done(store, job)
    assert store.item_states(job.id) == {"done": 10}


def test_a_failing_job_does_not_stop_the_pump(store, monkeypatch):
    from conserve_bench.serve import pump as pump_module

    monkeypatch.setattr(pump_module, "IDLE_POLL_S", 0.01)
    bad, good = requests_job(store, 6, "bad"), requests_job(store, 6, "good")
    with running(pump(store, FakeEngine(fail_after=3))):
        wait_done(store, good)
    failed = store.get_job(bad.id)
    assert failed.state == "failed" and failed.error.startswith("FakeEngineError")
    assert store.item_states(bad.id) == {"done": 3, "pending": 3}
