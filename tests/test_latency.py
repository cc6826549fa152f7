"""The step-latency model, without torch or vLLM: fitting, budget inversions, storage."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve_bench.sched.latency import (FEATURES, ChunkShape, FitError, LatencyModel, Sample,
                                    StepShape, _largest_within, _nnls_lawson_hanson,
                                    evaluate, evaluate_shapes, fit, shape_class, shape_medians,
                                    shape_spread, split_holdout)

# Plausible magnitudes for a small GPU model: 5 ms fixed, 20 us per prefill token, ...
TRUE_COEFFICIENTS = (5e-3, 2e-5, 4e-5, 2e-8, 1e-9, 3e-4, 2e-3)  # ..., 2 ms for a mixed batch


def random_shape(rng: np.random.Generator) -> StepShape:
    prefills = tuple(
        ChunkShape(int(rng.integers(1, 2048)), int(rng.integers(0, 4096)), bool(rng.random() < 0.3))
        for _ in range(rng.integers(0, 4)))
    decodes = tuple(int(c) for c in rng.integers(1, 8192, size=rng.integers(0, 64)))
    return StepShape(prefills, decodes)


def synthetic_samples(coefficients, num_samples: int, noise: float = 0.0,
                      seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    model = LatencyModel(coefficients)
    shapes = [random_shape(rng) for _ in range(num_samples)]
    # NOTE: multiplicative log-normal noise keeps every step_s > 0, as measurements are.
    return [Sample(s, model.predict(s) * float(np.exp(noise * rng.standard_normal())))
            for s in shapes]


def test_fit_recovers_noise_free_coefficients():
    model = fit(synthetic_samples(TRUE_COEFFICIENTS, 200))
    np.testing.assert_allclose(model.coefficients, TRUE_COEFFICIENTS, rtol=1e-6)
    assert model.fit_error is not None and model.fit_error.max_rel < 1e-8
    assert model.fit_error.num_samples == 200


def test_noisy_fit_generalises_to_holdout():
    train, holdout = split_holdout(synthetic_samples(TRUE_COEFFICIENTS, 400, noise=0.03, seed=1))
    error = evaluate(fit(train), holdout)
    assert error.num_samples == len(holdout) == 100
    assert error.median_rel < 0.05
    assert error.median_rel <= error.p90_rel <= error.max_rel


def test_a_shape_measured_several_times_is_judged_once_by_its_median():
    model = LatencyModel((0.01, 0, 0, 0, 0, 0, 0.0))  # every step: 10 ms
    steps = [Sample(StepShape((ChunkShape(8, 0, True),)), t) for t in (0.010, 0.0125, 0.020)]
    other = Sample(StepShape(decode_context_lens=(5,)), 0.008)
    assert evaluate_shapes(model, steps + [other]) == evaluate(
        model, [Sample(steps[0].shape, 0.0125), other])
    assert evaluate_shapes(model, steps).num_samples == 1
    assert evaluate(model, steps).max_rel == pytest.approx(0.5)  # the slow step on its own


def test_decode_steps_a_few_tokens_apart_are_one_shape():
    model = LatencyModel((0.01, 0, 1e-3, 0, 0, 0, 0.0))
    level = [Sample(StepShape(decode_context_lens=(c, c)), t)
             for c, t in ((64, 0.012), (65, 0.030), (66, 0.012))]  # one step slowed by the host
    other = Sample(StepShape(decode_context_lens=(200, 200)), 0.012)
    assert shape_class(level[0].shape) == shape_class(level[2].shape) != shape_class(other.shape)
    assert [s.step_s for s in shape_medians(level + [other])] == [0.012, 0.012]
    assert evaluate_shapes(model, level + [other]).max_rel == pytest.approx(0.0)


def test_the_shape_spread_is_each_repeated_steps_distance_from_its_shapes_median():
    one = [Sample(StepShape(decode_context_lens=(c,)), t) for c, t in ((64, 0.009), (66, 0.010), (65, 0.012))]
    alone = Sample(StepShape(decode_context_lens=(500,)), 0.5)  # measured once: no spread to tell
    assert sorted(shape_spread(one + [alone])) == pytest.approx(sorted([0.001 / 0.009, 0.0, 0.002 / 0.012]))
    assert shape_spread([alone]) == []


def test_fit_minimises_relative_not_absolute_error():
    from scipy.optimize import nnls

    rng = np.random.default_rng(5)
    truth = LatencyModel(TRUE_COEFFICIENTS)
    shapes = [random_shape(rng) for _ in range(300)]
    # A term the model cannot express, so relative and absolute fits disagree.
    samples = [Sample(s, truth.predict(s) + 2e-6 * s.num_decodes ** 2) for s in shapes]
    features = np.array([s.shape.features() for s in samples])
    scale = features.max(axis=0)
    absolute = nnls(features / scale, [s.step_s for s in samples])[0] / scale
    unweighted = LatencyModel(tuple(float(c) for c in absolute))

    def sum_sq_rel(model: LatencyModel) -> float:
        return sum(((model.predict(s.shape) - s.step_s) / s.step_s) ** 2 for s in samples)

    assert sum_sq_rel(fit(samples)) < 0.8 * sum_sq_rel(unweighted)


@pytest.mark.parametrize("zero_feature", range(1, len(FEATURES)))
def test_a_feature_the_engine_does_not_pay_for_is_fitted_as_almost_free(zero_feature):
    """Noise must not buy a free feature a real share of the step time (NNLS, not a clamp)."""
    coefficients = list(TRUE_COEFFICIENTS)
    coefficients[zero_feature] = 0.0
    samples = synthetic_samples(tuple(coefficients), 60, noise=0.1, seed=zero_feature)
    model = fit(samples)
    shares = [model.coefficients[zero_feature] * s.shape.features()[zero_feature] / model.predict(s.shape)
              for s in samples]
    assert float(np.median(shares)) < 0.05
    assert evaluate(model, samples).median_rel < 0.15


def test_lawson_hanson_fallback_matches_scipy():
    from scipy.optimize import nnls

    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.standard_normal((30, 6)), rng.standard_normal(30)
        expected = nnls(a, b)[0]
        got = _nnls_lawson_hanson(a, b)
        np.testing.assert_allclose(got, expected, atol=1e-9)


def test_fit_rejects_too_few_samples():
    samples = synthetic_samples(TRUE_COEFFICIENTS, len(FEATURES) - 1)
    with pytest.raises(ValueError, match="at least 7 samples"):
        fit(samples)


def test_fit_rejects_non_positive_times():
    samples = synthetic_samples(TRUE_COEFFICIENTS, 20)
    samples[3] = Sample(samples[3].shape, 0.0)
    with pytest.raises(ValueError, match="step_s > 0"):
        fit(samples)


def test_split_holdout_is_deterministic_and_disjoint():
    samples = synthetic_samples(TRUE_COEFFICIENTS, 40)
    train, holdout = split_holdout(samples, fraction=0.25, seed=7)
    assert (train, holdout) == split_holdout(samples, fraction=0.25, seed=7)
    assert len(holdout) == 10 and len(train) == 30
    assert sorted(map(id, train + holdout)) == sorted(map(id, samples))


def test_step_shape_features():
    shape = StepShape((ChunkShape(10, 100), ChunkShape(4, 0, prompt_logprobs=True)), (7, 9))
    assert shape.num_prefill_tokens == 14 and shape.num_decodes == 2 and shape.num_tokens == 16
    assert shape.decode_attention == 16
    assert shape.prefill_attention == 10 * (100 + 5) + 4 * 2
    assert shape.features() == (1.0, 14.0, 2.0, 16.0, 1058.0, 4.0, 1.0)  # mixed: chunks and decodes
    assert StepShape(shape.prefills).features()[-1] == StepShape((), (7, 9)).features()[-1] == 0.0
    assert StepShape((ChunkShape(0, 5),), (7,)).features()[-1] == 0.0  # an empty chunk is no prefill
    assert shape.with_decodes([3]).decode_context_lens == (7, 9, 3)
    assert shape.with_chunk(ChunkShape(1, 1)).num_prefill_tokens == 15


coefficient = st.floats(0, 1e-2, allow_subnormal=False)
models = st.builds(LatencyModel, st.tuples(*[coefficient] * len(FEATURES)))
chunks = st.builds(ChunkShape, st.integers(0, 4096), st.integers(0, 32768), st.booleans())
shapes = st.builds(StepShape, st.lists(chunks, max_size=4).map(tuple),
                   st.lists(st.integers(0, 32768), max_size=32).map(tuple))
budgets = st.floats(0, 2.0, allow_subnormal=False)
limits = st.sampled_from([1 << 20, 5000, 0])


@settings(max_examples=300, deadline=None)
@given(models, budgets, shapes, st.integers(0, 32768), st.booleans(), limits)
def test_max_tokens_within_is_the_exact_limit(model, budget_s, base, context, logprobs, limit):
    def predict(n: int) -> float:
        return model.predict(base.with_chunk(ChunkShape(n, context, logprobs)))

    n = model.max_tokens_within(budget_s, base, context, logprobs, max_tokens=limit)
    assert 0 <= n <= limit
    if model.predict(base) > budget_s:
        assert n == 0
        return
    assert predict(n) <= budget_s
    if n < limit:
        assert predict(n + 1) > budget_s


@settings(max_examples=300, deadline=None)
@given(models, budgets, shapes, st.integers(0, 32768), limits)
def test_max_decodes_within_is_the_exact_limit(model, budget_s, base, context_len, limit):
    def predict(k: int) -> float:
        return model.predict(base.with_decodes([context_len] * k))

    k = model.max_decodes_within(budget_s, base, context_len, max_decodes=limit)
    assert 0 <= k <= limit
    if model.predict(base) > budget_s:
        assert k == 0
        return
    assert predict(k) <= budget_s
    if k < limit:
        assert predict(k + 1) > budget_s


def test_the_first_chunk_beside_decodes_pays_the_mixed_batch_cost():
    """The 2-core CPU's case: 4 decodes take 40 ms; a 1-token chunk beside them 5 ms more,
    whatever its size (the prefill path's own cost), so a 2 ms share fits no chunk at all."""
    model = LatencyModel((0.03, 1.7e-3, 2.5e-3, 0.0, 0.0, 0.0, 5e-3))
    decodes = StepShape(decode_context_lens=(256,) * 4)
    base = model.predict(decodes)
    assert model.predict(decodes.with_chunk(ChunkShape(1, 0))) == pytest.approx(base + 1.7e-3 + 5e-3)
    assert model.max_tokens_within(base + 2e-3, decodes, context=0) == 0
    assert model.max_tokens_within(base + 5e-3 + 10 * 1.7e-3 + 1e-9, decodes, context=0) == 10
    chunk = StepShape((ChunkShape(64, 0),))  # and the first decode beside a chunk
    assert model.max_decodes_within(model.predict(chunk) + 4e-3, chunk, 256) == 0
    assert model.max_decodes_within(model.predict(chunk) + 5e-3 + 2 * 2.5e-3 + 1e-9, chunk, 256) == 2
    assert model.max_tokens_within(0.03 + 10 * 1.7e-3 + 1e-9, StepShape(), context=0) == 10  # alone: none


def test_max_tokens_within_matches_a_hand_computed_case():
    model = LatencyModel((1e-3, 1e-5, 0.0, 0.0, 0.0, 0.0, 0.0))
    assert model.max_tokens_within(2e-3, StepShape(), context=0) == 100
    assert model.max_tokens_within(0.5e-3, StepShape(), context=0) == 0


@pytest.mark.parametrize("estimate", [0.0, 1.0, 12_344.0, 12_345.0, 12_346.0, 9e5, math.inf, -1.0])
def test_budget_search_is_exact_and_cheap_from_any_estimate(estimate):
    calls = []

    def predict_n(n: int) -> float:
        calls.append(n)
        return 1.0 + n * 1e-4

    assert _largest_within(predict_n, 1.0 + 12_345.5e-4, estimate, max_n=1 << 20) == 12_345
    assert len(calls) < 80


@settings(max_examples=100)
@given(shapes, st.integers(1, 4096), st.integers(0, 32768), models, st.floats(1e-7, 1e-2))
def test_prompt_logprob_chunks_cost_more(base, num_tokens, context, model, c_l):
    def predict(model: LatencyModel, prompt_logprobs: bool) -> float:
        return model.predict(base.with_chunk(ChunkShape(num_tokens, context, prompt_logprobs)))

    # NOTE: c_l >= 1e-7 keeps the logprob term far above the rounding of the other terms.
    logprob = FEATURES.index("logprob_tokens")

    def with_c_l(value: float) -> LatencyModel:
        return LatencyModel(model.coefficients[:logprob] + (value,) + model.coefficients[logprob + 1:])

    scoring = with_c_l(c_l)
    assert predict(scoring, True) > predict(scoring, False)
    free = with_c_l(0.0)
    assert predict(free, True) == predict(free, False)


fit_errors = st.builds(FitError, st.floats(0, 10), st.floats(0, 10), st.floats(0, 10),
                       st.integers(0, 10**6))


@given(models, st.none() | fit_errors)
def test_to_dict_round_trips_through_json(model, fit_error):
    model = LatencyModel(model.coefficients, fit_error)
    assert LatencyModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model


def test_from_dict_rejects_other_features_or_versions():
    data = LatencyModel(TRUE_COEFFICIENTS).to_dict()
    renamed = dict(data, features=[*FEATURES[:-1], "lora_adapters"])
    with pytest.raises(ValueError, match="features"):
        LatencyModel.from_dict(renamed)
    with pytest.raises(ValueError, match="version"):
        LatencyModel.from_dict(dict(data, version=99))


def test_model_rejects_negative_or_misshapen_coefficients():
    with pytest.raises(ValueError):
        LatencyModel((1.0, -1e-6, 0.0, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        LatencyModel((1.0, 0.0))


def test_import_does_not_load_torch_or_vllm():
    """The latency model, the policy, the step log and the vLLM conventions are plain data."""
    code = ("import sys, conserve_bench.sched.latency, conserve_bench.sched.policy, "
            "conserve_bench.sched.steplog, conserve_bench.vllm_plugin.overrides; "
            "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
