"""The runner on the fake engine: its window, batched commits, stopping, dead and live owners.

What `submit`, `serve` and the lm-eval backend rely on, proven in milliseconds; the real
engine under a real SIGKILL is tests/test_durability.py.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

import pytest

from conserve_bench.config import JobSpec, LeaseConfig, RunConfig
from conserve_bench.engine.contract import ItemEngine
from conserve_bench.engine.fake import FakeEngine, FakeEngineError, fake_result
from conserve_bench.errors import ItemsFailedError
from conserve_bench.jobs import runner as runner_module
from conserve_bench.jobs.runner import Runner, Stopped
from conserve_bench.store import Store, WorkItem

from .conftest import wait_for

BOTH_DIALECTS = True
KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def add_job(store, num_items: int):
    job = store.create_job(JobSpec(tasks=("t",), source="requests"))
    work = [WorkItem(f"k{i:03d}", KINDS[i % 3], {"i": i}) for i in range(num_items)]
    store.add_items(job.id, work)
    return job.id, [w.key for w in work]


class CommitLog:
    """Wraps `store.complete_items` to see each batch the runner commits."""

    def __init__(self, store):
        self.batches: list[int] = []
        complete = store.complete_items

        def logged(owner, results, attempts=None):
            self.batches.append(len(results))
            return complete(owner, results, attempts)

        store.complete_items = logged


def test_the_fake_engine_keeps_the_engine_contract():
    assert isinstance(FakeEngine(), ItemEngine)


def test_window_bounds_claimed_uncommitted_items_at_every_step(store):
    job_id, keys = add_job(store, 100)
    seen = []
    engine = FakeEngine(items_per_step=3,
                        on_step=lambda: seen.append(store.item_states(job_id).get("running", 0)))
    commits = CommitLog(store)
    results = Runner(store, engine, RunConfig(max_inflight=8)).run(job_id, keys)
    assert results == {w: fake_result(w, KINDS[int(w[1:]) % 3]) for w in keys}
    assert max(seen) == 8  # the window is filled, never exceeded
    assert store.item_states(job_id) == {"done": 100}
    # half a window per transaction (the last may be smaller), never more than the window
    assert all(4 <= n <= 8 for n in commits.batches[:-1]) and sum(commits.batches) == 100


def test_commits_come_per_second_when_items_finish_slowly(store, monkeypatch):
    monkeypatch.setattr(runner_module, "COMMIT_INTERVAL_S", 0.05)
    job_id, keys = add_job(store, 6)
    commits = CommitLog(store)
    Runner(store, FakeEngine(items_per_step=1, step_s=0.03), RunConfig(max_inflight=64)).run(job_id, keys)
    assert len(commits.batches) >= 3  # an item per 0.03 s step, a commit every 0.05 s: not one at the end


def test_runner_claims_only_the_kind_it_is_given(store):
    job_id, keys = add_job(store, 9)
    engine = FakeEngine()
    Runner(store, engine).run(job_id, keys[::3], "loglikelihood")
    assert engine.submitted == keys[::3]
    assert store.item_states(job_id) == {"done": 3, "pending": 6}


def test_a_stop_request_keeps_what_was_committed_and_release_returns_the_rest(store):
    job_id, keys = add_job(store, 40)
    runner = Runner(store, FakeEngine(items_per_step=2), RunConfig(max_inflight=8),
                    should_stop=lambda: store.item_states(job_id).get("done", 0) > 0)
    with pytest.raises(Stopped):
        runner.run(job_id, keys)
    states = store.item_states(job_id)
    assert 0 < states["done"] <= 8 and states.get("running", 0) > 0
    assert runner.release() == states["running"]
    assert store.item_states(job_id) == {"done": states["done"], "pending": 40 - states["done"]}
    assert runner.stats.num_items == states["done"]


def test_an_engine_failure_propagates_and_loses_no_committed_item(store):
    job_id, keys = add_job(store, 40)
    runner = Runner(store, FakeEngine(items_per_step=4, fail_after=12), RunConfig(max_inflight=8))
    with pytest.raises(FakeEngineError):
        runner.run(job_id, keys)
    runner.release()
    assert store.item_states(job_id) == {"done": 12, "pending": 28}  # the finally commit


def test_a_jobs_requests_are_out_of_the_collectors_walks_while_it_runs_and_given_back_after(store):
    """What a job holds when its run starts (lm-eval's requests) is frozen for the run: the
    collector's passes skip it (`jobs.heap`); after the run, failed or not, it is back."""
    job_id, keys = add_job(store, 40)
    requests = [{"arguments": (f"question {i}", " A")} for i in range(100)]  # made before the run
    tracked = lambda: id(requests) in set(map(id, gc.get_objects()))  # noqa: E731
    frozen_before = gc.get_freeze_count()

    def watch(seen: list) -> Callable[[], None]:  # NOTE: one walk of the heap, at the first step
        return lambda: seen.append(tracked() if not seen else gc.get_freeze_count() == frozen_before)

    failed, finished = [], []
    runner = Runner(store, FakeEngine(fail_after=12, on_step=watch(failed)), RunConfig(max_inflight=8))
    with pytest.raises(FakeEngineError):
        runner.run(job_id, keys)
    runner.release()
    assert failed and tracked() and gc.get_freeze_count() == frozen_before
    Runner(store, FakeEngine(on_step=watch(finished)), RunConfig(max_inflight=8)).run(job_id, keys)
    assert finished and not any(failed + finished)
    assert tracked() and gc.get_freeze_count() == frozen_before
    assert store.item_states(job_id) == {"done": 40}


def test_items_of_a_dead_replica_are_reclaimed_once_its_lease_expires(store, monkeypatch):
    monkeypatch.setattr(runner_module, "WAIT_FOR_OTHERS_S", 0.05)
    job_id, keys = add_job(store, 10)
    short = Store(store.url, LeaseConfig(lease_s=0.5, heartbeat_s=0.1))
    short.claim_items(job_id, "killed", 4)  # a runner SIGKILLed while these were in flight
    engine = FakeEngine()
    Runner(store, engine, RunConfig(max_inflight=4)).run(job_id, keys)
    assert store.item_states(job_id) == {"done": 10}
    assert sorted(engine.submitted) == keys
    assert store.run_counts(job_id) == {k: 2 if i < 4 else 1 for i, k in enumerate(keys)}


def test_items_a_live_owner_holds_are_waited_for_not_taken(store, monkeypatch):
    monkeypatch.setattr(runner_module, "WAIT_FOR_OTHERS_S", 0.01)
    job_id, keys = add_job(store, 6)
    other = "elsewhere:1"  # another host, its claim fresh: presumed alive
    held = [w.key for w in store.claim_items(job_id, other, 2)]
    engine, results = FakeEngine(), {}
    thread = threading.Thread(target=lambda: results.update(Runner(store, engine).run(job_id, keys)))
    thread.start()
    wait_for(lambda: store.item_states(job_id).get("done") == 4, "the free items")
    assert thread.is_alive() and set(engine.submitted) == set(keys) - set(held)
    assert store.complete_items(other, {k: "theirs" for k in held}) == 2
    thread.join(10)
    assert not thread.is_alive() and all(results[k] == "theirs" for k in held)


def test_an_item_the_engine_refuses_is_retried_then_failed_and_counted(store):
    """Every other item is committed; the refused one is tried `max_attempts` times, each
    attempt counted, then failed with the engine's error."""
    job_id, keys = add_job(store, 12)
    runner = Runner(store, FakeEngine(poisoned=[keys[5]]), RunConfig(max_inflight=4))
    with pytest.raises(ItemsFailedError, match=f"{keys[5]}: FakeEngineError: item {keys[5]} is poisoned"):
        runner.run(job_id, keys)
    assert store.item_states(job_id) == {"done": 11, "failed": 1}
    assert (runner.stats.num_items, runner.stats.num_failed) == (11, store.leases.max_attempts)


def test_a_run_first_takes_back_what_its_replica_holds_but_no_runner_tracks(store, monkeypatch):
    """Items a failed give-back left running under this replica (a store outage): no claim
    takes its owner's own, so without this the run waited for them for ever."""
    from conserve_bench.jobs.replica import Replica

    monkeypatch.setattr(runner_module, "WAIT_FOR_OTHERS_S", 0.01)
    job_id, keys = add_job(store, 6)
    with Replica(store, "test") as replica:
        store.claim_items(job_id, replica.id, 3)  # what an earlier run lost track of
        engine, results = FakeEngine(), {}
        runner = Runner(store, engine, RunConfig(max_inflight=4), replica=replica)
        thread = threading.Thread(target=lambda: results.update(runner.run(job_id, keys)),
                                  daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive() and len(results) == 6
    assert store.item_states(job_id) == {"done": 6}
    assert sorted(engine.submitted) == keys  # each once: given back, no attempt lost
    assert set(store.run_counts(job_id).values()) == {1, 2}
