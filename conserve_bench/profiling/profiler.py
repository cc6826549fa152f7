"""Profiling: drive a real engine through a sweep of batch shapes and fit the latency model.

Owns the sweeps (prefill chunks, decode batches at several context lengths, mixed batches,
prompt-logprob prefills), run in interleaved rounds, and how each probe becomes prompts of
random tokens: distinct per request, so no step reads another probe's prefix cache (only a
probe that asks for cached context primes and reuses its own prefix). Step times come only
from the scheduler's step log, the engine's own per-step execution time; this module never
times a step itself. Storage and key matching are `profiles`' job.

    >>> result = run_profile(Store("sqlite:///conserve.db"), "smollm2-135m", quick=True)
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from conserve_bench.profiling.profiles import (Profile, current_key, refit_for, require_profile,
                                               save_profile)
from conserve_bench.sched.latency import (FEATURES, ChunkShape, FitError, LatencyModel, Sample,
                                          StepShape, evaluate_shapes, fit, shape_class,
                                          shape_medians, split_holdout)
from conserve_bench.sched.steplog import log_size, read_step_log
from conserve_bench.vllm_plugin.overrides import engine_overrides

if TYPE_CHECKING:
    from conserve_bench.config import ModelOptions
    from conserve_bench.engine.local import Engine
    from conserve_bench.sched.refit import RefitStatus
    from conserve_bench.store import Store

ProgressFn = Callable[[int, int], None]  # (num_probes_done, num_probes)
MIXED_SPACING = 2  # engine steps between two prefills joining a decode batch
BLOCKER_TOKENS = 256  # the prefill that holds the engine while a decode probe is queued
HOLDOUT_FRACTION = 0.25
# NOTE: a sweep runs ROUNDS times, one whole round after another, so every shape is measured
# ROUNDS times minutes apart: a burst of load from another process (a shared 2-core host)
# slows one round of a shape, not all, and the fit and the held-out error use each shape's
# median step. It also covers the first prompt-logprob prefill of a new size, 25-30% slower
# than its repeats (fresh memory for its full-vocabulary logits).
ROUNDS = 3
FEATURE_UNITS = ("/step", "/prefill token", "/decode", "/decode context token",
                 "/prefill attention pair", "/prompt-logprob token", "/step with prefills and decodes")


@dataclass(frozen=True)
class PrefillProbe:
    """Prompts submitted together, each a prefill chunk after `context` cached tokens: one
    step, or more when vLLM schedules the first request before the next one arrives."""

    chunk_tokens: tuple[int, ...]
    context: int = 0
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        # NOTE: a chunk at context > 0 comes from a prefix-cache hit on a primed prefix, and
        # requests with prompt logprobs never read the prefix cache.
        if self.context and self.prompt_logprobs:
            raise ValueError("prompt-logprob prefills cannot start after cached context")


@dataclass(frozen=True)
class DecodeProbe:
    """`num_requests` prompts of `context` tokens decoding together, the batch halving every
    `steps_per_level` steps down to one request; the `mixed` prefills (num_tokens,
    prompt_logprobs) join the decode batch one at a time (tiny ones too: a mixed batch has a
    fixed cost of its own, the model's `mixed` term)."""

    context: int
    num_requests: int
    mixed: tuple[tuple[int, bool], ...] = ()
    steps_per_level: int = 3  # NOTE: steps of one level are one shape class, measured 3x a round


Probe = Union[PrefillProbe, DecodeProbe]


@dataclass(frozen=True)
class Sweep:
    name: str
    probes: tuple[Probe, ...]
    rounds: int = ROUNDS
    warmup: tuple[Probe, ...] = (PrefillProbe((256,)), PrefillProbe((64,), prompt_logprobs=True),
                                 DecodeProbe(64, 8))


def _decode_probes(contexts: Sequence[int], max_batch_tokens: int,
                   mixed: Sequence[tuple[tuple[int, bool], ...]]) -> tuple[DecodeProbe, ...]:
    # NOTE: every decode has its own KV (distinct prompts), so a probe costs context x batch
    # prefill tokens; the batch is capped by that, as a real engine's KV cache caps it too.
    return tuple(DecodeProbe(c, min(64, max(1, max_batch_tokens // c)), m)
                 for c, m in zip(contexts, mixed))


def _paired_joins(context: int, num_requests: int, num_joins: int = 8) -> DecodeProbe:
    """A decode batch held at `num_requests` while 1-token prompts join every other step: the
    mixed steps alternate with decode-only steps of the same batch, back to back, so what a
    mixed batch costs over the same decodes is measured out of a busy host's drift (both
    shapes' medians over many steps; 0.5-1.2 ms for 4-16 decodes on 2 CPU cores, where one
    tiny join per batch size had left the fit anywhere in 0-3 ms, run to run).
    """
    return DecodeProbe(context, num_requests, ((1, False),) * num_joins,
                       steps_per_level=MIXED_SPACING * num_joins + 2)


QUICK = Sweep("quick", (
    *(PrefillProbe((n,)) for n in (16, 64, 256, 512, 1024)),
    PrefillProbe((128,) * 4), PrefillProbe((256,), context=512), PrefillProbe((64,), context=1024),
    *(PrefillProbe((n,), prompt_logprobs=True) for n in (64, 512)),
    *_decode_probes((64, 256, 512, 1024), 2048,
                    [((128, False), (512, False)), ((256, True), (1, False)), ((64, False), (8, False)),
                     ((32, False),)]),
    _paired_joins(256, 4),
))

FULL = Sweep("full", (
    *(PrefillProbe((n,)) for n in (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2040)),
    *(PrefillProbe(chunks) for chunks in ((64,) * 8, (256,) * 4, (512,) * 2, (32,) * 16)),
    *(PrefillProbe((n,), prompt_logprobs=True) for n in (16, 64, 256, 512, 1024, 2040)),
    PrefillProbe((128,) * 4, prompt_logprobs=True),
    *(PrefillProbe(chunks, context=c) for c, chunks in
      ((256, (256,)), (512, (128,)), (512, (1024,)), (1024, (512,)), (1536, (256,)),
       (1024, (64,) * 4))),
    *_decode_probes((64, 128, 256, 512, 1024, 1536), 8192,
                    [((128, False), (512, False)), ((1024, False), (1, False)), ((256, True), (64, False)),
                     ((32, False), (256, False)), ((512, True), (8, False)), ((128, False),)]),
    _paired_joins(256, 4), _paired_joins(1024, 2),
))


BASE_CONTEXT = 2048  # QUICK and FULL stay within this context; longer ones come from the engine


def sweep_for(quick: bool, max_model_len: int) -> Sweep:
    """QUICK or FULL, plus probes at the long contexts this engine scores: the latency model
    must cover the prompts it will plan (MMLU 5-shot prompts reach ~3,000 tokens)."""
    base = QUICK if quick else FULL
    return replace(base, probes=base.probes + long_context_probes(max_model_len, quick))


def long_context_probes(max_model_len: int, quick: bool) -> tuple[Probe, ...]:
    """Long prompts, chunks after long cached contexts and decodes at long contexts, up to half
    the engine's context length (none when that is within BASE_CONTEXT); QUICK takes a
    quarter of the context length only, and no long prompt from scratch."""
    contexts = [c for c in (max_model_len // 4, max_model_len // 2) if c > BASE_CONTEXT // 2]
    if quick:
        return tuple(p for c in contexts[:1]
                     for p in (PrefillProbe((1024,), context=c), DecodeProbe(c, 1)))
    return tuple(p for c in contexts
                 for p in (PrefillProbe((min(c, 4096),)), PrefillProbe((256,), context=c),
                           DecodeProbe(c, max(1, 2 * BASE_CONTEXT // c))))


@dataclass(frozen=True)
class SweepResult:
    """The steps each probe produced, as the scheduler measured them, and the sweep's wall time."""

    samples_by_probe: tuple[tuple[Sample, ...], ...]
    wall_s: float

    @property
    def samples(self) -> list[Sample]:
        return [s for probe in self.samples_by_probe for s in probe]


@dataclass(frozen=True)
class ProfileResult:
    profile: Profile
    sweep: SweepResult
    train_error: FitError


def run_profile(store: Store, model: str, quick: bool = False,
                on_progress: ProgressFn | None = None,
                on_started: Callable[[], None] | None = None,
                options: ModelOptions | None = None) -> ProfileResult:
    """Start an engine for `model` loaded as `options` say, profile it, fit, and store the
    profile under its key."""
    from conserve_bench.engine.local import start_engine
    from conserve_bench.engine.models import resolve_model

    ref = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="conserve-profile-") as workdir:
        # NOTE: step times in the layout `serve` plans them in (vLLM's engine-core process)
        overrides = {**engine_overrides(step_log=Path(workdir) / "steps.jsonl"),
                     "engine_core_in_process": False}
        with start_engine(ref, options=options, **overrides) as engine:
            if on_started is not None:
                on_started()
            result = profile_engine(engine, sweep_for(quick, engine.max_model_len), on_progress)
    save_profile(store, result.profile)
    return result


def show_profile(store: Store, model: str,
                 options: ModelOptions | None = None) -> tuple[Profile, tuple[RefitStatus, float] | None]:
    """The stored profile that applies to `model` loaded as `options` say on this machine
    (ProfileNotFoundError if none), and its latest live refit with when it was stored (None if
    no server refitted it)."""
    from conserve_bench.engine.local import engine_config
    from conserve_bench.engine.models import resolve_model

    cfg = engine_config(resolve_model(model), options)
    profile = require_profile(store, current_key(cfg.model_name, cfg.dtype, cfg.tensor_parallel_size))
    return profile, refit_for(store, profile.key)


def summary_rows(profile: Profile,
                 refit: tuple[RefitStatus, float] | None = None) -> list[tuple[str, str, str]]:
    """(quantity, profile's value, live refit's value) rows: the key, each coefficient with its
    unit, the fit errors; the refit's column is empty without one."""
    key = profile.key
    status = refit[0] if refit else None
    rows = [("model", f"{key.model} ({key.dtype})", ""), ("device", key.device, ""),
            ("vLLM", key.vllm_version, ""),
            ("samples", f"{profile.num_samples} profiled steps",
             f"{status.num_steps} live steps, {status.num_refits} refits" if status else "")]
    refit_coefficients = status.refit.coefficients if status else (None,) * len(FEATURES)
    rows += [(name, _ms(value, unit), _ms(live, unit)) for name, value, live, unit in
             zip(FEATURES, profile.model.coefficients, refit_coefficients, FEATURE_UNITS)]
    if profile.created_at is not None:
        rows.append(("stored", _when(profile.created_at), _when(refit[1]) if refit else ""))
    for label, error, unit in (("train", profile.train_error, "shapes"),
                               ("held-out", profile.holdout_error, "shapes")):
        if error is not None:
            rows.append((f"{label} error (median / P90 / max)", _error(error, unit), ""))
    if status is not None:
        rows.append(("error on the newest live steps (median / P90 / max)",
                     _error(status.profile_error, "steps"), _error(status.refit_error, "steps")))
        rows.append(("plans while serving", "" if status.adopted else "yes",
                     "yes" if status.adopted else ""))
    return rows


def _when(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_s))


def _ms(value: float | None, unit: str) -> str:
    return "" if value is None else f"{value * 1e3:.4g} ms{unit}"


def _error(error: FitError, unit: str) -> str:
    return (f"{error.median_rel:.1%} / {error.p90_rel:.1%} / {error.max_rel:.1%} "
            f"over {error.num_samples} {unit}")


def profile_engine(engine: Engine, sweep: Sweep, on_progress: ProgressFn | None = None,
                   seed: int = 0) -> ProfileResult:
    """Run `sweep` on an engine started with a step log; fit each shape's median step (a
    shape measured in several rounds counts once, at its typical time): `fit_profile`."""
    run_sweep(engine, sweep.warmup, seed=seed + 1)  # NOTE: warm-up steps are dropped
    result = run_sweep(engine, sweep.probes, on_progress, seed=seed, rounds=sweep.rounds)
    samples = measured_samples(sweep.probes, result)
    model, holdout_error = fit_profile(samples, seed)
    key = current_key(engine.cfg.model_name, engine.cfg.dtype, engine.cfg.tensor_parallel_size)
    profile = Profile(key, model, len(samples), holdout_error)
    return ProfileResult(profile, result, model.fit_error)


BLOCKER_STEP = StepShape((ChunkShape(BLOCKER_TOKENS, 0),))


def measured_samples(probes: Sequence[Probe], result: SweepResult) -> list[Sample]:
    """The steps the model is fitted and judged on: every probe's, except a decode probe's
    blocker prefill when it ran alone.

    NOTE: that step runs while this process hands the probe's prompts to the engine core. On
    a host with no core to spare (engine.local.reserved_cpus: 2 cores) the shape's median
    came out 10% above what the model fitted on every other shape predicted: a quick sweep
    has four times as many blockers as prefill probes of that size, so the median was theirs.
    """
    return [sample for probe, samples in zip(probes, result.samples_by_probe, strict=True)
            for sample in samples
            if not (isinstance(probe, DecodeProbe) and sample.shape == BLOCKER_STEP)]


def fit_profile(samples: Sequence[Sample], seed: int = 0) -> tuple[LatencyModel, FitError | None]:
    """The model fitted on every shape's median, and the held-out error of the same fit made
    without a split of the shapes (`fit_holdout`).

    NOTE: the held-out error judges the procedure on shapes its fit never saw; the model then
    uses every shape. A coefficient that few shapes carry must not hinge on the split: one
    quick sweep's `mixed` term came out 0 to 3.3 ms over six splits, 1.9 ms on all shapes.
    """
    return fit(shape_medians(samples)), fit_holdout(samples, seed)[1]


def fit_holdout(samples: Sequence[Sample], seed: int = 0) -> tuple[LatencyModel, FitError | None]:
    """The model fitted on a training split of shapes, and its error on the held-out shapes."""
    train, holdout = split_distinct_shapes(samples, HOLDOUT_FRACTION, seed)
    model = fit(shape_medians(train))
    return model, evaluate_shapes(model, holdout) if holdout else None


def split_distinct_shapes(samples: Sequence[Sample], fraction: float = HOLDOUT_FRACTION,
                          seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, holdout) with no batch shape (`shape_class`) on both sides: the holdout is
    shapes never fitted."""
    classes = list(dict.fromkeys(shape_class(s.shape) for s in samples))
    held = set(split_holdout(classes, fraction, seed)[1])
    return ([s for s in samples if shape_class(s.shape) not in held],
            [s for s in samples if shape_class(s.shape) in held])


def run_sweep(engine: Engine, probes: Sequence[Probe], on_progress: ProgressFn | None = None,
              seed: int = 0, rounds: int = 1) -> SweepResult:
    """Run each probe to completion, the whole list `rounds` times (new prompts each time);
    collect the steps the scheduler logged for each probe, over all rounds."""
    if engine.step_log is None:
        raise ValueError("profiling needs an engine started with a step log "
                         "(engine_overrides(step_log=...))")
    for probe in probes:
        _check_fits(probe, engine.max_model_len)
    draw = _TokenSource(np.random.default_rng(seed), engine.vocab_size)
    t0 = time.perf_counter()
    samples_by_probe: list[list[Sample]] = [[] for _ in probes]
    for done, (i, probe) in enumerate(((i, p) for _ in range(rounds) for i, p in enumerate(probes)), 1):
        offset = log_size(engine.step_log)
        _RUNNERS[type(probe)](engine, probe, draw)
        samples_by_probe[i] += read_step_log(engine.step_log, offset)[0]
        if on_progress is not None:
            on_progress(done, rounds * len(probes))
    return SweepResult(tuple(map(tuple, samples_by_probe)), time.perf_counter() - t0)


def _check_fits(probe: Probe, max_model_len: int) -> None:
    longest = (probe.context + max(probe.chunk_tokens) if isinstance(probe, PrefillProbe)
               else max([probe.context] + [n for n, _ in probe.mixed]))
    # NOTE: vLLM rejects a prompt that leaves no room for the one token it always generates.
    if longest >= max_model_len:
        raise ValueError(f"{probe} needs prompts of {longest} tokens; max_model_len is "
                         f"{max_model_len}")


class _TokenSource:
    """Distinct random prompts (fixed seed), so no probe reads another's prefix cache."""

    def __init__(self, rng: np.random.Generator, vocab_size: int):
        self._rng = rng
        self._low = min(1000, vocab_size // 10)  # skip the special tokens at the bottom
        self._high = vocab_size

    def __call__(self, num_tokens: int) -> list[int]:
        return self._rng.integers(self._low, self._high, num_tokens).tolist()


def _params(max_tokens: int, prompt_logprobs: bool = False) -> dict[str, Any]:
    return dict(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False,
                prompt_logprobs=1 if prompt_logprobs else None)


def _run_prefill(engine: Engine, probe: PrefillProbe, draw: _TokenSource) -> None:
    prefix = draw(probe.context)
    if prefix:  # prime the prefix cache: the chunks below then start at `context`
        engine.submit_tokens([prefix], **_params(1))
        engine.run_until_idle()
    prompts = [prefix + draw(n) for n in probe.chunk_tokens]
    engine.submit_tokens(prompts, **_params(1, probe.prompt_logprobs))
    engine.run_until_idle()


def _run_decode(engine: Engine, probe: DecodeProbe, draw: _TokenSource) -> None:
    # NOTE: the engine core steps as soon as a request reaches it. A blocker prefill keeps it
    # busy while the probe's prompts are queued, so they prefill together in its next steps,
    # alike in every round; else how they split depends on timing, and each round logs other
    # shapes, each measured once.
    engine.submit_tokens([draw(BLOCKER_TOKENS)], **_params(1))
    prefilling: set[str] = set()
    for max_tokens, num_requests in decode_groups(probe.num_requests, probe.steps_per_level):
        prompts = [draw(probe.context) for _ in range(num_requests)]
        prefilling |= set(engine.submit_tokens(prompts, **_params(max_tokens)))
    while prefilling and engine.has_unfinished():
        prefilling -= engine.step_tokens()
    for num_tokens, prompt_logprobs in probe.mixed:
        engine.submit_tokens([draw(num_tokens)], **_params(1, prompt_logprobs))
        for _ in range(MIXED_SPACING):
            engine.step_tokens()
    engine.run_until_idle()


_RUNNERS = {PrefillProbe: _run_prefill, DecodeProbe: _run_decode}


def decode_groups(num_requests: int, steps_per_level: int) -> list[tuple[int, int]]:
    """(max_tokens, num_requests) groups that make a decode batch of `num_requests` halve
    every `steps_per_level` steps down to one: each level is a new batch size measured."""
    levels = [num_requests >> h for h in range(num_requests.bit_length())]
    groups: dict[int, int] = {}
    for rank in range(num_requests):
        num_levels = sum(rank < level for level in levels)
        # NOTE: the first token comes from the prefill step; the rest are decode steps.
        max_tokens = 1 + steps_per_level * num_levels
        groups[max_tokens] = groups.get(max_tokens, 0) + 1
    return sorted(groups.items(), reverse=True)
