"""Partial generations without vLLM: the pure splitting and joining of a generation's tokens
(Hypothesis), the runner's partials and continuations on the fake engine, the store's
partials (fenced, counted, cleared) and a store of the previous schema that migrates and
resumes. The real engine's exactness is tests/test_partials_engine.py.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.config import JobSpec, RunConfig
from conserve_bench.engine.fake import FakeEngine, fake_text, fake_tokens
from conserve_bench.engine.generation import (Generation, continued, cut_at_stops, generated_text,
                                              is_resumable, num_tokens_to_stop)
from conserve_bench.jobs import runner as runner_module
from conserve_bench.jobs.results import resume_summary
from conserve_bench.jobs.runner import Runner, Stopped
from conserve_bench.store import MIGRATIONS, Store, WorkItem
from conserve_bench.store.db import create_engine
from conserve_bench.store.migrations import migrate

from .conftest import dead_replica

# -- the pure part: a generation split at any partial, streamed in any deltas -----------------

VOCAB = ["a", "b", "ab", "\n", "Q", "Q:", ":", " ", "xyz", "é", ""]  # "" like a special token


def decode(token_ids) -> str:
    return "".join(VOCAB[t] for t in token_ids)


STOPS = st.lists(st.sampled_from(["\n", "Q:", "ab", "b\nQ", "zz", "xyzé", ":a"]), max_size=3)


def uninterrupted(stream: list[int], until, max_tokens: int) -> list[int]:
    """What an engine generates in one run: up to the first token whose text completes a stop
    string, or `max_tokens`."""
    end = num_tokens_to_stop(stream[:max_tokens], until, decode)
    return stream[:max_tokens if end is None else end]


def continued_run(stream: list[int], until, max_tokens: int, cut: int, deltas) -> Generation:
    """The same generation interrupted after `cut` tokens and continued: the engine checks
    stop strings only over the text it generates itself (as vLLM does), in `deltas` chunks."""
    generation = Generation.start("k", until, max_tokens, decode, stream[:cut])
    if generation.is_complete():
        return generation
    _, params = generation.continued([7, 7], {"max_tokens": max_tokens})
    new, position = [], cut
    for size in deltas:
        chunk = stream[position:position + size][:params["max_tokens"] - len(new)]
        if not chunk:
            break
        end = num_tokens_to_stop(new + chunk, until, decode)  # the engine's own stop check
        if end is not None:
            chunk = chunk[:end - len(new)]
        position += len(chunk)
        new += chunk
        if generation.extend(chunk) or end is not None:
            break
    return generation


@settings(max_examples=400, deadline=None)
@given(stream=st.lists(st.integers(0, len(VOCAB) - 1), min_size=1, max_size=40), until=STOPS,
       max_tokens=st.integers(1, 40), cut=st.integers(0, 40),
       deltas=st.lists(st.integers(1, 5), min_size=45, max_size=45))
def test_a_continued_generation_ends_with_the_uninterrupted_text(stream, until, max_tokens, cut,
                                                                 deltas):
    stream = stream + [0] * 40  # the engine never runs dry before max_tokens
    whole = uninterrupted(stream, until, max_tokens)
    cut = min(cut, len(whole))  # a partial holds tokens the generation really made
    generation = continued_run(stream, until, max_tokens, cut, deltas)
    assert generation.text() == generated_text(whole, until, decode)
    assert generation.text() == cut_at_stops(decode(whole), until)  # lm-eval's `until`
    assert generation.token_ids[:len(whole)] == whole  # tokens past the stop change nothing
    assert generation.num_resumed == cut


@given(stream=st.lists(st.integers(0, len(VOCAB) - 1), max_size=30), until=STOPS)
def test_tokens_to_stop_is_the_first_prefix_holding_a_stop(stream, until):
    end = num_tokens_to_stop(stream, until, decode)
    holds = [any(s and s in decode(stream[:n]) for s in until) for n in range(len(stream) + 1)]
    assert end == (holds.index(True) if True in holds else None)


@given(prompt=st.lists(st.integers(0, 9), max_size=5), partial=st.lists(st.integers(0, 9), max_size=5))
def test_a_continuation_keeps_the_whole_generations_limit(prompt, partial):
    token_ids, params = continued(prompt, {"max_tokens": 10, "temperature": 0.0}, partial)
    assert token_ids == prompt + partial
    assert params == {"max_tokens": 10 - len(partial), "temperature": 0.0}


def test_a_stop_straddling_the_partial_ends_the_generation_there():
    # "b\nQ" starts in the partial ("ab") and ends in the new tokens ("\n", "Q")
    generation = Generation.start("k", ("b\nQ",), 10, decode, [2])
    assert not generation.is_complete()
    assert not generation.extend([3])  # "ab\n": not yet
    assert generation.extend([4])  # "ab\nQ": stop, though the engine saw only "\nQ"
    assert generation.text() == "a"


def test_a_partial_that_already_ends_the_generation_is_complete():
    assert Generation.start("k", ("\n",), 10, decode, [0, 3, 0]).is_complete()
    assert Generation.start("k", (), 2, decode, [0, 1]).is_complete()
    assert not Generation.start("k", ("\n",), 10, decode, [0, 1]).is_complete()


def test_only_greedy_or_unseeded_generations_continue():
    assert is_resumable({"temperature": 0.0, "seed": 3})
    assert is_resumable({"temperature": 0.7})
    assert not is_resumable({"temperature": 0.7, "seed": 3})


# -- the runner on the fake engine -----------------------------------------------------------

GEN_TOKENS = 40


@pytest.fixture(autouse=True)
def _fake_time_scale(monkeypatch):
    """The fake engine takes microseconds a step: no share bound on partials (it would
    space them out by the store's time), and commits (where a stop is seen) every few steps."""
    monkeypatch.setattr(runner_module, "MAX_PARTIALS_SHARE", float("inf"))
    monkeypatch.setattr(runner_module, "COMMIT_INTERVAL_S", 0.01)


def add_generations(store, num_items: int):
    job = store.create_job(JobSpec(tasks=("t",), source="requests"))
    work = [WorkItem(f"g{i:03d}", "generate_until", {"i": i}) for i in range(num_items)]
    store.add_items(job.id, work)
    return job.id, [w.key for w in work]


def expected_results(keys):
    return {key: fake_text(fake_tokens(key, GEN_TOKENS)) for key in keys}


class Killed(Exception):
    pass


def kill_after(engine: FakeEngine, num_tokens: int) -> None:
    """The engine dies (as with SIGKILL: nothing released) once it generated `num_tokens`."""
    step = engine.step

    def dying():
        if engine.num_generated_tokens >= num_tokens:
            raise Killed()
        return step()

    engine.step = dying


def test_a_killed_run_continues_its_generations_from_their_partials(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    job_id, keys = add_generations(store, 6)
    cfg = RunConfig(max_inflight=6, partial_tokens=5, partial_s=60)
    first = FakeEngine(gen_tokens=GEN_TOKENS)
    kill_after(first, 6 * GEN_TOKENS // 2)
    killed = dead_replica(store)
    runner = Runner(store, first, cfg, owner=killed)
    try:
        runner.run(job_id, keys)
    except Killed:
        pass
    status = store.get_job(job_id)
    assert status.num_done == 0 and status.num_partial_items == 6
    assert 6 * (GEN_TOKENS // 2 - 5) <= status.num_partial_tokens <= 6 * GEN_TOKENS // 2
    assert runner.stats.num_partial_saves >= 3

    assert store.end_leases([killed]) == 6  # its host knows it is dead: the leases end
    second = FakeEngine(gen_tokens=GEN_TOKENS)
    results = Runner(store, second, cfg).run(job_id, keys)
    assert results == expected_results(keys)  # as if never interrupted
    assert min(second.continued.values()) >= GEN_TOKENS // 2 - 5
    # what the kill cost: the tokens since the last save, never the whole generations
    redone = first.num_generated_tokens + second.num_generated_tokens - 6 * GEN_TOKENS
    assert 0 <= redone <= 6 * 5
    assert store.get_job(job_id).num_partial_items == 0  # cleared once done
    summary = resume_summary(store.resumes(job_id))
    assert summary["num_items"] == 6 and summary["num_resumes"] == 6
    assert summary["num_reused_tokens"] == status.num_partial_tokens
    assert summary["items"] == {key: 1 for key in keys}
    assert {i["key"]: i["num_resumes"] for i in store.job_items(job_id)} == summary["items"]


def test_a_graceful_stop_saves_every_generation_so_nothing_is_redone(store):
    job_id, keys = add_generations(store, 4)
    cfg = RunConfig(max_inflight=4, partial_tokens=1000, partial_s=600)  # none on the way
    first = FakeEngine(gen_tokens=GEN_TOKENS, step_s=0.002)
    runner = Runner(store, first, cfg,
                    should_stop=lambda: first.num_generated_tokens >= 4 * GEN_TOKENS // 2)
    try:
        runner.run(job_id, keys)
    except Stopped:
        runner.release()
    assert store.get_job(job_id).num_partial_tokens == first.num_generated_tokens
    second = FakeEngine(gen_tokens=GEN_TOKENS)
    assert Runner(store, second, cfg).run(job_id, keys) == expected_results(keys)
    assert first.num_generated_tokens + second.num_generated_tokens == 4 * GEN_TOKENS


def test_partials_off_means_a_generation_starts_over(store):
    job_id, keys = add_generations(store, 2)
    cfg = RunConfig(max_inflight=2, partial_tokens=0)
    first = FakeEngine(gen_tokens=GEN_TOKENS, step_s=0.002)
    runner = Runner(store, first, cfg, should_stop=lambda: first.num_generated_tokens >= 20)
    try:
        runner.run(job_id, keys)
    except Stopped:
        runner.release()
    assert store.get_job(job_id).num_partial_items == 0
    second = FakeEngine(gen_tokens=GEN_TOKENS)
    assert Runner(store, second, cfg).run(job_id, keys) == expected_results(keys)
    assert second.num_generated_tokens == 2 * GEN_TOKENS and set(second.continued.values()) == {0}


def test_partials_come_every_n_tokens_each_batched_in_one_transaction(store):
    job_id, keys = add_generations(store, 8)
    batches = []
    save = store.save_partials
    store.save_partials = lambda owner, partials, *rest: batches.append(len(partials)) or save(
        owner, partials, *rest)
    runner = Runner(store, FakeEngine(gen_tokens=GEN_TOKENS), RunConfig(
        max_inflight=8, partial_tokens=10, partial_s=600))
    assert runner.run(job_id, keys) == expected_results(keys)
    # all 8 gain a token per step: a save every 10 steps, all 8 in one transaction
    assert batches == [8, 8, 8] and runner.stats.num_partial_saves == 3
    assert runner.stats.num_generated_tokens == 8 * GEN_TOKENS


# -- the store ------------------------------------------------------------------------------


def test_only_the_owner_of_a_running_item_saves_its_partial(store):
    job_id, keys = add_generations(store, 3)
    store.claim_items(job_id, "me", 2)
    assert store.save_partials("me", {keys[0]: [1, 2, 3], keys[2]: [4]}) == 1  # keys[2] pending
    assert store.save_partials("other", {keys[0]: [9, 9, 9, 9]}) == 0  # fenced
    assert store.partials(job_id) == {keys[0]: [1, 2, 3]}
    job = store.get_job(job_id).to_dict()
    assert (job["partial_items"], job["partial_tokens"]) == (1, 3)
    assert store.resume_partials(keys) == {keys[0]: [1, 2, 3]}
    assert store.resumes(job_id) == {keys[0]: {"num_resumes": 1, "num_reused_tokens": 3}}
    store.clear_partials([keys[0]])  # not done yet: kept
    assert store.partials(job_id) == {keys[0]: [1, 2, 3]}
    store.complete_items("me", {keys[0]: "text"})
    store.clear_partials([keys[0]])
    assert store.partials(job_id) == {} and store.get_job(job_id).num_partial_tokens == 0
    assert store.resumes(job_id)[keys[0]]["num_resumes"] == 1  # counts stay for the results


def test_a_store_of_the_previous_schema_migrates_and_its_generations_resume(tmp_path):
    """A job interrupted under the schema before partials (its items leased by a replica that
    died) opens on this version: the items are taken over, saved as they run, and a
    second interruption continues from the partials."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    previous = MIGRATIONS[:-1]
    assert migrate(create_engine(url), previous) == len(previous)
    with create_engine(url).begin() as conn:
        conn.execute(sa.text("insert into jobs (id, state, spec, num_total, created_at, updated_at,"
                             " run_s) values ('j1', 'running', :spec, 3, 1.0, 1.0, 0.0)"),
                     {"spec": '{"tasks": ["t"], "source": "requests"}'})
        for i in range(3):  # leased by a replica that died, the lease long expired
            conn.execute(sa.text("insert into items (key, kind, args, state, owner, claimed_at,"
                                 " num_runs, lease_until, seq) values (:k, 'generate_until', '{}',"
                                 " 'running', 'gone:1', 1.0, 1, 1.0, :i)"), {"k": f"g{i}", "i": i})
            conn.execute(sa.text("insert into job_items (job_id, item_key, seq) values"
                                 " ('j1', :k, :i)"), {"k": f"g{i}", "i": i})
    store = Store(url)  # migrates on open
    assert store.get_job("j1").to_dict()["partial_items"] == 0
    keys = ["g0", "g1", "g2"]
    cfg = RunConfig(max_inflight=3, partial_tokens=4, partial_s=60)
    first = FakeEngine(gen_tokens=GEN_TOKENS)
    kill_after(first, 3 * 20)
    killed = dead_replica(store)
    try:
        Runner(store, first, cfg, owner=killed).run("j1", keys)
    except Killed:
        pass
    assert store.end_leases([killed]) == 3
    second = FakeEngine(gen_tokens=GEN_TOKENS)
    assert Runner(store, second, cfg).run("j1", keys) == expected_results(keys)
    assert min(second.continued.values()) >= 20 - 4
    assert resume_summary(store.resumes("j1"))["num_resumes"] == 3
