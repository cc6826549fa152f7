"""Layer-wise preemption on the real engine: abandoned steps change no result.

One engine for the module, with `ConserveConnector` loaded, small steps (256 tokens, so prompts
are chunked), an arrival file and the `connector.abort_layer` fault hook (a shared integer:
while it holds L, every step is cut at layer L the first time its work is attempted). The requests are all offline,
so every step is armed. Each test runs its workload uninterrupted first, with the
prefix cache reset, then cut, and compares greedy tokens and logprobs.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from conserve_bench.vllm_plugin.arrivals import ArrivalSignal, SharedInts
from conserve_bench.vllm_plugin.overrides import OFFLINE_PRIORITY
from conserve_bench.sched.steplog import read_step_log_with_notes

pytestmark = [pytest.mark.engine, pytest.mark.slow]  # its own engine: the connector loaded

CUT_AT_LAYER = 8
MAX_STEPS = 400
STEP_TIMEOUT_S = 180  # NOTE: a hang fails the test instead of blocking it (steps take seconds)
LOGPROB_TOLERANCE = 1e-3


class Preemptible:
    def __init__(self, engine, arrivals: ArrivalSignal, test_abort: SharedInts, step_log):
        self.engine, self.arrivals, self.test_abort, self.step_log = engine, arrivals, test_abort, step_log

    def run(self, *batches: tuple[list, dict], cut: bool = False) -> list:
        """Outputs of every `(prompts, sampling)` batch, submitted together and run to the end
        (with every step cut once at CUT_AT_LAYER if `cut`), in order."""
        # NOTE: before submitting: vLLM's engine core steps as soon as requests reach it
        self.test_abort.write(CUT_AT_LAYER if cut else 0)
        try:
            request_ids = [request_id for prompts, sampling in batches
                           for request_id in self.engine.submit_tokens(
                               prompts, priority=OFFLINE_PRIORITY, **sampling)]
            return self._drain(request_ids)
        finally:
            self.test_abort.write(0)

    def _drain(self, request_ids) -> list:
        llm_engine, done = self.engine.llm.llm_engine, {}
        pool = ThreadPoolExecutor(1)
        try:
            for _ in range(MAX_STEPS):
                if not llm_engine.has_unfinished_requests():
                    return [done[r] for r in request_ids]
                try:  # NOTE: a request that can never be scheduled again blocks step() for good
                    outputs = pool.submit(llm_engine.step).result(timeout=STEP_TIMEOUT_S)
                except FutureTimeout:
                    pytest.fail(f"no engine output for {STEP_TIMEOUT_S} s: the engine hangs")
                done.update((o.request_id, o) for o in outputs if o.finished)
            pytest.fail(f"requests still unfinished after {MAX_STEPS} steps")
        finally:
            pool.shutdown(wait=False)

    def steps(self):
        return read_step_log_with_notes(self.step_log)

    def reset_prefix_cache(self) -> None:
        assert self.engine.llm.reset_prefix_cache()


@pytest.fixture(scope="module")
def preemptible(model_ref, tmp_path_factory):
    from conserve_bench.engine.local import start_engine
    from conserve_bench.faults import ENV_VAR
    from conserve_bench.vllm_plugin.overrides import ConnectorConfig, engine_overrides

    folder = tmp_path_factory.mktemp("preemption")
    arrivals = ArrivalSignal.create(folder / "arrivals.bin")
    test_abort = SharedInts.create(folder / "test_abort.bin")
    step_log = folder / "steps.jsonl"
    overrides = {**engine_overrides(step_log=step_log, connector=ConnectorConfig(arrival_path=str(arrivals.path))),
                 "max_num_batched_tokens": 256, "max_num_seqs": 16,
                 # NOTE: compiled, as users run it (the suite's other engines are eager):
                 # safepoints must fire between torch.compile'd layers
                 "enforce_eager": False}
    with pytest.MonkeyPatch.context() as patch:  # NOTE: read by the connector as vLLM starts it
        patch.setenv(ENV_VAR, f"connector.abort_layer={test_abort.path}")
        engine = start_engine(model_ref, **overrides)
    with engine:
        yield Preemptible(engine, arrivals, test_abort, step_log)


def random_prompts(seed: int, lengths, vocab: int = 40_000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]


def assert_same_outputs(cut, baseline) -> None:
    for a, b in zip(cut, baseline):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.request_id
        for got, want in zip(a.outputs[0].logprobs or [], b.outputs[0].logprobs or []):
            for token, logprob in want.items():
                assert abs(got[token].logprob - logprob.logprob) < LOGPROB_TOLERANCE
        for got, want in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
            for token, logprob in (want or {}).items():
                assert abs(got[token].logprob - logprob.logprob) < LOGPROB_TOLERANCE


def aborted_since(preemptible, num_steps_before: int) -> list:
    return [(sample, notes) for sample, notes in preemptible.steps()[num_steps_before:]
            if notes.get("aborted")]


def test_cut_steps_give_the_uninterrupted_results(preemptible):
    """Prefill chunks, decodes and mixed prefill+decode steps, each cut once at layer 8."""
    short = random_prompts(1, [40, 57, 33, 70])
    long = random_prompts(2, [700, 600])
    generate = dict(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    score = dict(temperature=0.0, max_tokens=1, prompt_logprobs=1)

    def workload(cut: bool):
        preemptible.reset_prefix_cache()
        # NOTE: the first step admits everything (prefill only); then the long prompts' chunks
        # share steps with the short prompts' decodes (mixed); then decodes run alone.
        return preemptible.run((short + long[:1], generate), (long[1:], score), cut=cut)

    baseline = workload(cut=False)
    num_steps = len(preemptible.steps())
    cut = workload(cut=True)

    assert_same_outputs(cut, baseline)
    aborted = aborted_since(preemptible, num_steps)
    shapes = {(bool(s.shape.prefills), bool(s.shape.decode_context_lens)) for s, _ in aborted}
    assert shapes == {(True, False), (False, True), (True, True)}, shapes
    assert all(notes["abort_layer"] == CUT_AT_LAYER for _, notes in aborted)
    assert all(notes["arrival_to_abort_ms"] is None for _, notes in aborted)  # the fault hook


def test_a_cut_step_leaves_no_half_written_prefix_in_the_cache(preemptible):
    """A computes a shared prefix in steps that are cut; B, run alone afterwards, hits it."""
    prefix, suffix_a, suffix_b = random_prompts(3, [384, 20, 30])
    generate = dict(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)

    def a_then_b(cut_a: bool):
        preemptible.reset_prefix_cache()
        first = preemptible.run(([prefix + suffix_a], generate), cut=cut_a)
        return first + preemptible.run(([prefix + suffix_b], generate))

    baseline = a_then_b(cut_a=False)
    num_steps = len(preemptible.steps())
    cut = a_then_b(cut_a=True)

    assert_same_outputs(cut, baseline)
    aborted = aborted_since(preemptible, num_steps)
    assert any(c.num_context == 0 for s, _ in aborted for c in s.shape.prefills)  # A's first chunk


def test_an_arrival_from_another_thread_cuts_a_long_prefill(preemptible):
    prompt = random_prompts(4, [1800])
    # NOTE: no prompt logprobs: the forward pass is nearly the whole step, so an arrival
    # lands before a safepoint (one after the last one is served by the next step)
    generate = dict(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=1)
    preemptible.reset_prefix_cache()
    baseline = preemptible.run((prompt, generate))
    preemptible.reset_prefix_cache()
    num_steps = len(preemptible.steps())
    stamps, done = [], threading.Event()

    def arrive():
        """An arrival as each of the first three chunks (of seven, 256 tokens each) is logged:
        the next chunk is under way then, on a host of any speed. (The log's size says a step
        was logged without parsing it, beside the engine, every few milliseconds.)"""
        seen = preemptible.step_log.stat().st_size
        while len(stamps) < 3 and not done.is_set():
            if (logged := preemptible.step_log.stat().st_size) > seen:
                seen = logged
                preemptible.arrivals.announce()  # NOTE: no request follows: it cuts one step
                stamps.append(preemptible.arrivals.last_arrival_ns())
            time.sleep(0.005)

    thread = threading.Thread(target=arrive)
    thread.start()
    try:
        cut = preemptible.run((prompt, generate))
    finally:
        done.set()
        thread.join()

    assert_same_outputs(cut, baseline)
    from vllm.platforms import current_platform

    from conserve_bench.sched.policy import safepoint_every

    every = safepoint_every(waits_for_device=current_platform.is_cuda_alike())  # the connector's default
    aborted = [(s, notes) for s, notes in aborted_since(preemptible, num_steps)
               if notes["arrival_ns"] is not None]
    assert aborted, "no arrival cut a step"
    assert len(aborted) <= len(stamps)  # each arrival cuts one step at most
    for sample, notes in aborted:
        assert notes["arrival_ns"] in stamps
        # NOTE: announced during the step, or while the one before it ran to its end
        assert 0 <= notes["arrival_to_abort_ms"] <= 1e3 * sample.step_s * 2 + 60
        assert notes["abort_layer"] % every == 0 and notes["abort_layer"] < notes["num_layers"]
