"""Incremental KV checkpointing without an engine: `sched.kv_checkpoints.CheckpointBook` driven
by random steps, preemptions, resumes, finishes and pool limits against a model of the device's
and the host's contents; the CPU copies of `vllm_plugin.kvpool.HostPool` on real tensors; and how
benchmarks/kv_churn.py compares its two arms."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.sched.kv_checkpoints import CheckpointBook, Resume, pool_slots

BLOCK = 4


class World:
    """Requests whose device blocks hold (request, block index) once computed, a host pool of
    slots, and the book deciding what moves between them."""

    def __init__(self, num_slots: int):
        self.book = CheckpointBook(num_slots, BLOCK)
        self.host: dict[int, tuple[str, int]] = {}
        self.computed: dict[str, int] = {}  # running requests: tokens computed
        self.length: dict[str, int] = {}  # tokens the request has (prompt + output so far)
        self.preempted: dict[str, int] = {}  # preempted: tokens computed before
        self.arrival: dict[str, float] = {}
        self.resumes: list[Resume] = []

    def add(self, req_id: str, num_prompt: int) -> None:
        self.book.track(req_id, float(len(self.arrival)))
        self.arrival[req_id], self.computed[req_id], self.length[req_id] = len(self.arrival), 0, num_prompt

    def step(self, num_tokens: dict[str, int], ran: bool) -> None:
        committed = [(r, self.computed[r] + n, self.blocks(r)) for r, n in num_tokens.items()]
        saves = self.book.plan_saves(committed)
        for save in saves:
            assert save.block_id == self.blocks(save.req_id)[save.index]
            assert save.index < (self.computed[save.req_id] + num_tokens[save.req_id]) // BLOCK
            # an abandoned step's KV is half written: copied, it would be garbage
            self.host[save.slot] = (save.req_id, save.index) if ran else ("garbage", -1)
        self.book.finish_step(ran, [(r, c) for r, c, _ in committed])
        if ran:
            for r, n in num_tokens.items():
                self.computed[r] += n
                self.length[r] = max(self.length[r], self.computed[r] + 1)

    def blocks(self, req_id: str) -> list[int]:
        return [hash((req_id, i)) % 10_000 for i in range(64)]  # any stable device block ids

    def preempt(self, req_id: str) -> None:
        self.preempted[req_id] = self.computed.pop(req_id)
        self.book.mark_preempted([req_id])

    def resume(self, req_id: str, num_local: int) -> None:
        self.preempted.pop(req_id)
        num_loaded = self.book.num_matched_tokens(req_id, self.length[req_id], num_local)
        assert num_loaded % BLOCK == 0 and num_local + num_loaded < self.length[req_id]
        if num_loaded:
            loads, resume = self.book.plan_load(req_id, num_local, num_loaded, self.blocks(req_id))
            first = num_local // BLOCK
            for i, load in enumerate(loads):
                assert self.host[load.slot] == (req_id, first + i)  # the right KV, never garbage
                assert load.block_id == self.blocks(req_id)[first + i]
        else:
            resume = self.book.resumed_without_load(req_id, num_local)
        self.resumes.append(resume)
        self.computed[req_id] = num_local + num_loaded

    def finish(self, req_id: str) -> None:
        self.computed.pop(req_id, None)
        self.preempted.pop(req_id, None)
        self.book.release(req_id)

    def check(self) -> None:
        book = self.book
        owned = [s for c in book._checkpoints.values() for s in c.slots]
        assert len(owned) == len(set(owned)) == book.num_used  # disjoint; nothing leaks
        assert book.num_used <= book.stats().num_slots or not owned
        assert sorted(owned + book._free) == list(range(book.num_slots))
        for req_id, checkpoint in book._checkpoints.items():
            assert [self.host[s] for s in checkpoint.slots] == [(req_id, i) for i in range(len(checkpoint.slots))]
            known = self.computed.get(req_id, self.preempted.get(req_id, 0))
            assert len(checkpoint.slots) * BLOCK <= max(known, checkpoint.num_progress)


ops = st.lists(st.tuples(st.sampled_from(["add", "step", "abort", "preempt", "resume", "finish",
                                          "limit"]),
                         st.integers(0, 30), st.integers(0, 2**16)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 12), ops)
def test_checkpoints_always_hold_the_committed_kv_of_a_prefix(num_slots, script):
    world = World(num_slots)
    for op, n, seed in script:
        running, preempted = sorted(world.computed), sorted(world.preempted)
        if op == "add":
            world.add(f"r{len(world.arrival)}", n + 1)
        elif op in ("step", "abort") and running:
            chosen = [r for i, r in enumerate(running) if seed >> i & 1] or running[:1]
            num_tokens = {r: max(1, min(n, world.length[r] - world.computed[r])) for r in chosen}
            world.step(num_tokens, ran=op == "step")
        elif op == "preempt" and running:
            world.preempt(running[seed % len(running)])
        elif op == "resume" and preempted:
            req_id = preempted[seed % len(preempted)]
            progress = world.book._checkpoints[req_id].num_progress
            world.resume(req_id, min(n, progress) // BLOCK * BLOCK)  # vLLM's own hit, aligned
        elif op == "finish" and world.arrival:
            world.finish(f"r{seed % len(world.arrival)}")
        elif op == "limit":
            world.book.set_capacity(n % (num_slots + 1))
        world.check()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(1, 40), min_size=2, max_size=6))
def test_a_full_pool_never_evicts_a_checkpoint_ranked_above_the_saver(num_slots, prompts):
    """Preempted checkpoints outrank running ones; running ones arrived later outrank earlier."""
    world = World(num_slots)
    for i, num_prompt in enumerate(prompts):
        world.add(f"r{i}", num_prompt)
    for req_id in sorted(world.computed):
        world.step({req_id: world.length[req_id] - 1}, ran=True)
    kept = {r: len(c.slots) for r, c in world.book._checkpoints.items()}
    world.preempt("r0")
    before = world.book.num_checkpointed_tokens("r0")
    for req_id in sorted(world.computed):  # every running request computes more
        world.step({req_id: 2 * BLOCK}, ran=True)
        world.check()
    assert world.book.num_checkpointed_tokens("r0") == before  # preempted: never evicted
    ranks = {r: c.rank() for r, c in world.book._checkpoints.items()}
    for req_id, checkpoint in world.book._checkpoints.items():
        if len(checkpoint.slots) < kept[req_id]:  # lost blocks: only to higher-ranked savers
            assert any(ranks[other] > ranks[req_id] for other in ranks if other != req_id)


def test_a_resume_counts_what_was_loaded_found_and_recomputed():
    world = World(num_slots=2)
    world.add("a", 11)
    world.step({"a": 10}, ran=True)  # 2 full blocks fit the pool
    world.preempt("a")
    world.resume("a", num_local=0)
    assert world.resumes[-1] == Resume("a", 10, 8, 0) and world.resumes[-1].num_recomputed == 2
    world.add("b", 30)
    # b arrived later, so running a (preempted first, were vLLM to preempt) ranks below it:
    # b's blocks take both slots from a's checkpoint
    world.step({"b": 29}, ran=True)
    world.preempt("a")
    world.resume("a", num_local=4)  # its first block still in vLLM's prefix cache
    assert world.resumes[-1] == Resume("a", 10, 0, 4) and world.resumes[-1].num_recomputed == 6


def test_an_abandoned_step_saves_nothing_and_returns_its_slots():
    world = World(num_slots=4)
    world.add("a", 20)
    world.step({"a": 16}, ran=False)
    assert world.book.num_used == 0 and world.book.num_checkpointed_tokens("a") == 0
    world.step({"a": 16}, ran=True)
    assert world.book.num_checkpointed_tokens("a") == 16


def test_pool_slots_is_the_whole_blocks_a_budget_holds():
    assert pool_slots(1.0, 2**20) == 1024
    assert pool_slots(0.0, 123) == 0


def test_host_pool_copies_block_rows_both_ways_on_the_cpu():
    import torch

    from conserve_bench.vllm_plugin.kvpool import HostPool

    kv = torch.arange(6 * 2 * 4 * 3, dtype=torch.float32).reshape(6, 2, 4, 3)  # [blocks, ...]
    original = kv.clone()
    pool = HostPool({"layer.0": kv, "layer.1": kv}, num_slots=3, num_blocks=6)  # one tensor shared
    pool.save([4, 1], [0, 2])
    kv.zero_()
    pool.load([2, 0], [5, 3])
    assert torch.equal(kv[5], original[1]) and torch.equal(kv[3], original[4])
    assert not kv[[0, 1, 2, 4]].any()


def test_the_churn_benchmark_compares_the_arms_round_by_round():
    """benchmarks/kv_churn.py: offline speed-up is the median of per-round ratios (rounds are
    paired: same prompts, same arrivals), latency ratios are P99 over every round, and the
    resumes add up."""
    from benchmarks import kv_churn as churn

    arms = {"on": {"offline_tokens_per_s": [60.0, 30.0], "num_bursts": [4, 5],
                   "ttft_s": [1.0] * 99 + [2.0], "tbt_s": [0.05] * 100,
                   "resumes": [[512, 512, 0, 0], [300, 256, 0, 44]]},
            "off": {"offline_tokens_per_s": [40.0, 10.0], "num_bursts": [6, 7],
                    "ttft_s": [1.0] * 99 + [4.0], "tbt_s": [0.05] * 99 + [0.5],
                    "resumes": [[512, 0, 128, 384]]}}
    result = churn.summarize(arms)
    assert result["ratios"]["per_round"] == [1.5, 3.0]
    assert result["ratios"]["offline_tokens_per_s"] == 2.25
    assert result["ratios"]["ttft_ms_p99"] < 1 and result["ratios"]["tbt_ms_p99"] < 1
    assert result["met"]
    on = result["arms"]["on"]
    assert (on["num_resumes"], on["loaded_tokens"], on["recomputed_tokens"]) == (2, 768, 44)
    assert on["num_bursts"] == 9 and on["num_online"] == 100
    arms["on"]["offline_tokens_per_s"] = [44.0, 12.0]  # 1.1x, 1.2x: below the 1.25x target
    assert not churn.summarize(arms)["met"]
