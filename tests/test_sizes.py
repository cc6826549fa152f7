"""Size corrections: the size classes, `SizedModel`'s budget inversions (against brute force)
and the live corrections `LiveModel` learns, pure Python, no engine."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.sched.latency import ChunkShape, FitError, LatencyModel, Sample, StepShape
from conserve_bench.sched.refit import LiveModel, RefitConfig, RefitStatus, SizeCorrections, WarmStart
from conserve_bench.sched.sizes import ALL_STEPS, SizedModel, size_class

BASE = LatencyModel((0.02, 1e-3, 0.8e-3, 1e-7, 1e-8, 0.5e-3, 1e-3))
# a CPU's kernels: a decode batch of 2 runs 1.25x the linear model, of 3-4 0.9x
BIASED = {"decodes 2": 1.25, "decodes 3-4": 0.9, "prefill 1-63 + decodes": 1.4, "prefill 64-255": 1.1}


def decodes(num: int, context: int = 300) -> StepShape:
    return StepShape(decode_context_lens=(context,) * num)


def test_size_classes_name_decode_batches_and_prefill_tokens():
    assert size_class(StepShape()) is None
    assert [size_class(decodes(n)) for n in (1, 2, 3, 4, 5, 9, 40)] == [
        "decodes 1", "decodes 2", "decodes 3-4", "decodes 3-4", "decodes 5-8", "decodes 9+", "decodes 9+"]
    chunk = StepShape(prefills=(ChunkShape(40, 0), ChunkShape(30, 100)))
    assert size_class(chunk) == "prefill 64-255"
    assert size_class(chunk.with_decodes([10])) == "prefill 64-255 + decodes"
    assert size_class(StepShape(prefills=(ChunkShape(2000, 0),))) == "prefill 1024+"


def test_a_sized_model_scales_a_step_by_its_class_and_leaves_the_others():
    sized = SizedModel.of(BASE, BIASED)
    assert sized.predict(decodes(2)) == pytest.approx(1.25 * BASE.predict(decodes(2)))
    assert sized.predict(decodes(1)) == BASE.predict(decodes(1))
    assert sized.predict(StepShape()) == BASE.predict(StepShape())
    assert sized.base == BASE and sized.coefficients == BASE.coefficients
    with pytest.raises(ValueError):
        SizedModel.of(BASE, {"decodes 2": 0.0})


def test_an_offline_decode_beside_one_online_decode_is_priced_at_the_batch_of_twos_cost():
    """The linear model says a second decode adds 3%; on the CPU the batch of 2 runs 25% over:
    within a 5% share of one online decode, no offline decode joins once that is known."""
    budget = 1.05 * BASE.predict(decodes(1))
    assert BASE.max_decodes_within(budget, decodes(1), 300, max_decodes=1) == 1
    assert SizedModel.of(BASE, BIASED).max_decodes_within(budget, decodes(1), 300, max_decodes=1) == 0


shapes = st.builds(
    lambda chunks, contexts: StepShape(tuple(ChunkShape(n, c) for n, c in chunks), tuple(contexts)),
    st.lists(st.tuples(st.integers(1, 400), st.integers(0, 600)), max_size=2),
    st.lists(st.integers(1, 900), max_size=6))


@settings(max_examples=300, deadline=None)
@given(base=shapes, budget=st.floats(0.0, 0.8), context=st.integers(0, 900), cap=st.integers(1, 40),
       logprobs=st.booleans())
def test_the_inversions_give_the_most_tokens_within_the_budget(base, budget, context, cap, logprobs):
    sized = SizedModel.of(BASE, BIASED, default=1.15)

    def most(within):
        return max(n for n in range(cap + 1) if n == 0 or within(n) <= budget)

    assert sized.max_decodes_within(budget, base, context, cap) == most(
        lambda k: sized.predict_from(base, base.with_decodes([context] * k)))
    assert sized.max_tokens_within(budget, base, context, logprobs, cap) == most(
        lambda n: sized.predict_from(base, base.with_chunk(ChunkShape(n, context, logprobs))))


def test_work_added_to_a_step_is_never_priced_below_the_steps_own_correction():
    """Offline tokens beside one online decode: their class's correction (1.0 here) is below
    the decode's own (1.2), and priced by it they would look cheaper than free."""
    sized = SizedModel.of(BASE, {"decodes 1": 1.2, "prefill 1-63 + decodes": 1.0})
    online = decodes(1)
    budget = 1.05 * sized.predict(online)
    assert sized.predict(online.with_chunk(ChunkShape(4, 0))) < budget  # by its own class: 4 fit
    fits = sized.max_tokens_within(budget, online, 0, max_tokens=40)
    assert fits == BASE.max_tokens_within(budget / 1.2, online, 0, max_tokens=40)
    assert sized.predict_from(online, online.with_chunk(ChunkShape(fits, 0))) <= budget
    assert sized.predict_from(StepShape(), decodes(1)) == sized.predict(decodes(1))  # nothing to grow from


def live_steps(num: int, seed: int = 0) -> list[Sample]:
    """Decode batches of 1-6 timed as the biased CPU runs them, with 3% noise."""
    rng = np.random.default_rng(seed)
    truth = SizedModel.of(BASE, BIASED)
    return [Sample(shape, truth.predict(shape) * float(np.exp(0.03 * rng.standard_normal())))
            for shape in (decodes(int(rng.integers(1, 7)), int(rng.integers(50, 900))) for _ in range(num))]


CFG = RefitConfig(window=200, every=50, min_samples=100, warmup_steps=10, size_min_samples=8)


def test_the_live_model_learns_each_classs_correction_and_plans_with_it():
    live = LiveModel(BASE, CFG)
    for sample in live_steps(10 + 80):
        live.observe(sample)
    sized = live.sized
    assert sized.corrections["decodes 2"] == pytest.approx(1.25, rel=0.05)
    assert sized.corrections["decodes 3-4"] == pytest.approx(0.9, rel=0.05)
    errors = [abs(m.predict(s.shape) - s.step_s) / s.step_s for m in (BASE, sized)
              for s in live_steps(200, seed=1) if s.shape.num_decodes == 2]
    assert np.median(errors[len(errors) // 2:]) < 0.05 < np.median(errors[:len(errors) // 2])
    # a refit follows the linear part, the classes are measured against it afresh, and its
    # status carries them (the next server starts from them)
    refitted = [(status, live.sized) for sample in live_steps(200, seed=2)
                if (status := live.observe(sample)) is not None]
    status, sized = refitted[-1]
    assert sized.base == live.model and status.corrections == {**sized.corrections, ALL_STEPS: sized.default}
    assert live.sized.corrections["decodes 2"] == pytest.approx(1.25, rel=0.1)


def test_a_class_without_steps_of_its_own_is_priced_as_all_steps_are():
    """Online decodes run 1.3x the model; an offline chunk beside them (a class no step has
    shown yet) is priced 1.3x too, not by the bare model: it no longer fits a 5% share."""
    sizes = SizeCorrections(window=64, min_samples=8)
    for _ in range(8):
        sizes.observe(Sample(decodes(1), 1.3 * BASE.predict(decodes(1))), BASE)
    sized = sizes.model(BASE)
    assert sized.default == pytest.approx(1.3) and "prefill 1-63 + decodes" not in sized.corrections
    budget = 1.05 * sized.predict(decodes(1))
    one_token = decodes(1).with_chunk(ChunkShape(1, 0))
    assert SizedModel.of(BASE, sized.corrections).predict(one_token) < budget  # by the bare model
    assert sized.predict(one_token) > budget
    assert sized.max_tokens_within(budget, decodes(1), 0) == 0
    assert sizes.measured(BASE) == {"decodes 1": pytest.approx(1.3), ALL_STEPS: pytest.approx(1.3)}


def test_no_corrections_without_adoption_or_a_window():
    for cfg in (replace(CFG, adopt=False), replace(CFG, size_window=0)):
        live = LiveModel(BASE, cfg)
        for sample in live_steps(100):
            live.observe(sample)
        assert live.sized is live.model


def test_a_class_counts_from_its_min_samples_th_step_and_keeps_its_prior_before():
    sizes = SizeCorrections(window=64, min_samples=8, prior={"decodes 2": 1.5})
    slow = [Sample(decodes(2), 1.2 * BASE.predict(decodes(2)))] * 7
    for sample in slow:
        sizes.observe(sample, BASE)
    assert sizes.model(BASE).corrections == {"decodes 2": 1.5}
    sizes.observe(slow[0], BASE)
    assert sizes.model(BASE).corrections["decodes 2"] == pytest.approx(1.2)
    faster = LatencyModel(tuple(1.2 * c for c in BASE.coefficients))
    assert sizes.model(faster).corrections["decodes 2"] == pytest.approx(1.0)  # measured afresh


def test_a_warm_start_carries_the_corrections_and_older_states_have_none():
    status = RefitStatus(FitError(0.3, 0.4, 0.6, 50), FitError(0.05, 0.1, 0.2, 50), True, BASE, 3, 400,
                         corrections={"decodes 2": 1.2})
    kept = RefitStatus.from_dict(json.loads(json.dumps(status.to_dict())))
    warm = WarmStart.from_dict(json.loads(json.dumps(WarmStart.from_status(kept).to_dict())))
    assert warm.corrections == {"decodes 2": 1.2}
    older = {k: v for k, v in status.to_dict().items() if k != "corrections"}
    assert RefitStatus.from_dict(older).corrections == {}
    live = LiveModel(BASE, CFG, corrections={"decodes 2": 1.2})
    assert live.sized.predict(decodes(2)) == pytest.approx(1.2 * BASE.predict(decodes(2)))
