"""The profiler: sweep plans and splits without vLLM, then a tiny sweep on the session engine
(its ConserveScheduler logs every step), checked on shapes, never on timings."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conserve_bench.sched.latency import (ChunkShape, LatencyModel, Sample, StepShape, fit,
                                          shape_medians)
from conserve_bench.profiling.profiler import (BLOCKER_TOKENS, FULL, QUICK, DecodeProbe,
                                           PrefillProbe, Sweep, SweepResult, _check_fits,
                                           MIXED_SPACING, decode_groups, fit_holdout, fit_profile,
                                           measured_samples, profile_engine, run_sweep,
                                           split_distinct_shapes, summary_rows, sweep_for)
from conserve_bench.profiling.profiles import current_key, profile_for, save_profile

from .conftest import cli
from .test_latency import TRUE_COEFFICIENTS, synthetic_samples

# -- plans, without an engine -----------------------------------------------------------------


@given(st.integers(1, 256), st.integers(1, 4))
def test_decode_batch_halves_level_by_level(num_requests, steps_per_level):
    groups = decode_groups(num_requests, steps_per_level)
    assert sum(n for _, n in groups) == num_requests
    # batch size alive at each decode step: requests with more tokens left than the step index
    alive = [sum(n for max_tokens, n in groups if max_tokens - 1 > step)
             for step in range(max(m for m, _ in groups) - 1)]
    levels = alive[::steps_per_level]
    assert levels[0] == num_requests and levels[-1] == 1
    assert all(b == a // 2 for a, b in zip(levels, levels[1:]))


@pytest.mark.parametrize("max_model_len", [2048, 4096, 8192, 32768])
@pytest.mark.parametrize("quick", [True, False])
def test_sweeps_fit_and_reach_into_the_engines_context(quick, max_model_len):
    sweep = sweep_for(quick, max_model_len)
    for probe in sweep.probes + sweep.warmup:
        _check_fits(probe, max_model_len)
    longest = max(p.context + max(getattr(p, "chunk_tokens", (0,))) for p in sweep.probes)
    assert longest >= min(max_model_len // 2, 2040)  # the latency model covers long prompts
    with pytest.raises(ValueError, match="max_model_len"):
        _check_fits(PrefillProbe((1024,), context=1024), 2048)
    with pytest.raises(ValueError, match="prompt-logprob"):
        PrefillProbe((64,), context=512, prompt_logprobs=True)


def test_sweeps_cover_every_feature():
    for sweep in (QUICK, FULL):
        prefills = [p for p in sweep.probes if isinstance(p, PrefillProbe)]
        decodes = [p for p in sweep.probes if isinstance(p, DecodeProbe)]
        assert any(p.prompt_logprobs for p in prefills) and any(p.context for p in prefills)
        assert len({p.context for p in decodes}) >= 3 and any(p.mixed for p in decodes)
        # a decode batch held while 1-token prompts join every other step (`_paired_joins`)
        paired = [p for p in decodes if len(p.mixed) >= 8 and {n for n, _ in p.mixed} == {1}]
        assert paired and all(p.steps_per_level > MIXED_SPACING * len(p.mixed) for p in paired)


@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 3)), min_size=2, max_size=60))
def test_holdout_never_shares_a_shape_with_training(pairs):
    samples = [Sample(StepShape((ChunkShape(n, 0),), (64,) * d), 0.1 + i)
               for i, (n, d) in enumerate(pairs)]
    train, holdout = split_distinct_shapes(samples, 0.25, seed=0)
    assert sorted(train + holdout, key=lambda s: s.step_s) == samples
    assert not {s.shape for s in train} & {s.shape for s in holdout}


def test_the_profiles_model_is_fitted_on_every_shape_whatever_the_holdout_split():
    samples = synthetic_samples(TRUE_COEFFICIENTS, 80, noise=0.05, seed=4)
    fits = [fit_profile(samples, seed) for seed in range(4)]
    assert {model for model, _ in fits} == {fit(shape_medians(samples))}
    assert [error for _, error in fits] == [fit_holdout(samples, seed)[1] for seed in range(4)]
    # a fit on a training split is not that model: the split would decide the coefficients
    assert len({fit_holdout(samples, seed)[0] for seed in range(4)}) > 1


def test_a_decode_probes_lone_blocker_step_is_not_measured():
    blocker = StepShape((ChunkShape(BLOCKER_TOKENS, 0),))
    with_prompts = StepShape((ChunkShape(BLOCKER_TOKENS, 0), ChunkShape(32, 0)))
    decode = StepShape(decode_context_lens=(33, 33))
    probes = (PrefillProbe((BLOCKER_TOKENS,)), DecodeProbe(32, 2))
    result = SweepResult(((Sample(blocker, 0.40),),
                          (Sample(blocker, 0.44), Sample(with_prompts, 0.5), Sample(decode, 0.05))), 1.0)
    # the prefill probe's own step of that shape stays, and so does a blocker sharing its step
    assert measured_samples(probes, result) == [Sample(blocker, 0.40), Sample(with_prompts, 0.5),
                                                Sample(decode, 0.05)]


# -- on the session engine --------------------------------------------------------------------

TINY = (PrefillProbe((256,)), PrefillProbe((32,), prompt_logprobs=True),
        DecodeProbe(32, 8, mixed=((64, False),)), PrefillProbe((48, 48), context=128))


@pytest.fixture(scope="module")
def tiny_sweep(engine):
    return run_sweep(engine, TINY[:2], rounds=2), run_sweep(engine, TINY[2:], seed=1)


@pytest.mark.engine
def test_a_prefill_is_logged_as_one_chunk_in_every_round(tiny_sweep):
    (whole, logprobs), (_, cached) = (s.samples_by_probe for s in tiny_sweep)
    assert [s.shape for s in whole] == [StepShape((ChunkShape(256, 0),))] * 2
    assert [s.shape for s in logprobs] == [StepShape((ChunkShape(32, 0, prompt_logprobs=True),))] * 2
    # the primed prefix first, then two chunks that start after the cached 128 tokens (in one
    # step, or two when the engine schedules the first before the second arrives)
    assert cached[0].shape == StepShape((ChunkShape(128, 0),))
    assert [c for s in cached[1:] for c in s.shape.prefills] == [ChunkShape(48, 128)] * 2
    assert all(s.step_s > 0 for sweep in tiny_sweep for s in sweep.samples)


@pytest.mark.engine
def test_decodes_are_logged_with_their_contexts(tiny_sweep):
    steps = [s.shape for s in tiny_sweep[1].samples_by_probe[0]]
    # distinct random prompts: every prompt token is prefilled exactly once (no cache hits);
    # the blocker first (the probe's prompts join its step or follow it, as timing goes)
    assert sum(shape.num_prefill_tokens for shape in steps) == BLOCKER_TOKENS + 8 * 32 + 64
    assert steps[0].prefills[0] == ChunkShape(BLOCKER_TOKENS, 0)
    batch_sizes = [shape.num_decodes for shape in steps if shape.num_decodes]
    assert max(batch_sizes) == 8 and min(batch_sizes) == 1
    full_batch = next(shape for shape in steps if shape.num_decodes == 8)
    assert all(32 <= c < 32 + 16 for c in full_batch.decode_context_lens)
    assert any(ChunkShape(64, 0) in shape.prefills for shape in steps if shape.num_decodes)


@pytest.mark.engine
def test_the_fit_explains_the_steps_it_was_fitted_on(tiny_sweep):
    """The sweep's steps, as logged, are what the fit learns from: it predicts most of them
    within a loose margin (a shared CPU slows some steps; the fit rejects those), and a longer
    prefill costs more."""
    samples = tiny_sweep[0].samples + tiny_sweep[1].samples
    model = fit(samples)
    errors = sorted(abs(model.predict(s.shape) / s.step_s - 1) for s in samples)
    assert errors[len(errors) // 2] < 0.3, errors
    assert model.predict(StepShape((ChunkShape(1024, 0),))) > model.predict(
        StepShape((ChunkShape(64, 0),)))


@pytest.mark.engine
def test_profile_engine_fits_stores_and_is_found_again(engine, store, tiny_sweep):
    profile = profile_engine(engine, Sweep("tiny", TINY, warmup=(), rounds=1), seed=3).profile
    assert profile.key == current_key(engine.cfg.model_name, engine.cfg.dtype)
    assert profile.holdout_error is not None and profile.holdout_error.num_samples > 0
    save_profile(store, profile)
    assert profile_for(store, profile.key).model == profile.model
    assert any("held-out" in name for name, *_ in summary_rows(profile))


# -- the CLI ----------------------------------------------------------------------------------


PROFILING_CLI = """
import os, sys
from types import SimpleNamespace
from conserve_bench.cli import main
from conserve_bench.profiling import profiler
from conserve_bench.sched.latency import LatencyModel
from conserve_bench.profiling.profiles import Profile, current_key

def run_profile(store, model, quick, on_progress, on_started, options=None):  # the engine's part, faked
    os.write(2, b"WARNING vLLM engine chatter\\n")
    on_started()
    on_progress(1, 1)
    latency = LatencyModel((0.04, 2e-3, 2.4e-3, 4e-6, 1e-6, 8e-4, 0.0))
    return SimpleNamespace(profile=Profile(current_key(model, "float32"), latency, 42),
                           sweep=SimpleNamespace(samples=[None] * 42, wall_s=61.0))

profiler.run_profile = run_profile
sys.argv = ["conserve-bench", "profile", "--quick", *sys.argv[1:]]
main()
"""


def test_profile_keeps_vllms_output_in_a_log_unless_verbose(tmp_path):
    """`profile` prints its progress, one line and the table; what the engine writes goes to
    results/profile.log (named on that line), or to the terminal with --verbose."""
    db = f"sqlite:///{tmp_path / 'store.db'}"
    quiet = subprocess.run([sys.executable, "-c", PROFILING_CLI, "--db", db], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert "chatter" not in quiet.stderr + quiet.stdout and "prefill_tokens" in quiet.stdout
    assert "swept 42 steps in 61s; log results/profile.log" in quiet.stderr
    assert (tmp_path / "results" / "profile.log").read_text() == "WARNING vLLM engine chatter\n"
    verbose = subprocess.run([sys.executable, "-c", PROFILING_CLI, "--db", db, "--verbose"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 0, verbose.stderr
    assert "WARNING vLLM engine chatter" in verbose.stderr and "log " not in verbose.stderr


def test_profile_show_prints_the_stored_profile_or_one_line(tmp_path, store):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    missing = cli("profile", "--show", "--db", url)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().startswith("error: no latency profile for smollm2-135m")
    assert len(missing.stderr.strip().splitlines()) == 1
    from conserve_bench.profiling.profiles import Profile

    model = LatencyModel((0.04, 2e-3, 2.4e-3, 4e-6, 1e-6, 8e-4, 0.0))
    save_profile(store, Profile(current_key("smollm2-135m", "float32"), model, 42))
    shown = cli("profile", "--show", "--db", url)
    assert shown.returncode == 0, shown.stderr
    assert "prefill_tokens" in shown.stdout and "logprob_tokens" in shown.stdout
    assert "live refit" not in shown.stdout
    from conserve_bench.sched.latency import FitError
    from conserve_bench.profiling.profiles import save_refit
    from conserve_bench.sched.refit import RefitStatus

    refit = LatencyModel((0.0512, 2e-3, 2.4e-3, 4e-6, 1e-6, 8e-4, 0.0))
    save_refit(store, current_key("smollm2-135m", "float32"), RefitStatus(
        FitError(0.213, 0.3, 0.5, 96), FitError(0.021, 0.05, 0.1, 96), True, refit, 3, 500))
    with_refit = cli("profile", "--show", "--db", url)
    assert with_refit.returncode == 0, with_refit.stderr
    for text in ("live refit", "51.2 ms/step", "21.3%", "2.1%", "500 live steps"):
        assert text in with_refit.stdout, text
