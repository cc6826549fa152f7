"""Keeping the latency model true while serving: refit it from the engine's live steps.

Owns the bounded window of recent live steps, when to refit, and which model plans: a refit
replaces the profile's model only while it predicts the newest live steps better than the
profile does; the size corrections on top of it. Pure: numpy through `latency` (refits only),
no vLLM, no clock; `ConserveScheduler` feeds it each executed step and plans with
`LiveModel.sized`.

    live = LiveModel(profile_model)
    live.observe(sample)          # after every step; refits every `RefitConfig.every` steps
    live.model, live.status       # the linear model that plans, and both models' live errors
    live.sized                    # that model corrected by size class: what the planner uses

A restarted server starts from what the last one learned (`WarmStart`: the refit it planned
with, its size corrections and tail margins, stored with the profile) instead of from the
idle profile.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from conserve_bench.sched.latency import FitError, LatencyModel, Sample, StepTable, evaluate, fit
from conserve_bench.sched.policy import TailFactors
from conserve_bench.sched.sizes import ALL_STEPS, SizedModel, size_class

# A tail margin counts a kind's steps among the server's last this many (`TailMargin`):
# about 40 s of serving on 2 CPU cores, 3-4 windows of online decode steps.
TAIL_MAX_AGE_STEPS = 1024


@dataclass(frozen=True)
class RefitConfig:
    """How the live model is refitted. Steps count only when usable (see `LiveModel.observe`)."""

    window: int = 256  # live steps kept: the most recent ones
    every: int = 32  # refit after this many new steps
    min_samples: int = 64  # no refit on fewer
    judge_fraction: float = 0.25  # the newest share of the window, held out to judge by
    warmup_steps: int = 16  # the engine's first steps (allocations, compiled graphs) never count
    # NOTE: each coefficient is pulled toward the profile's with this weight per live step,
    # so a feature the live window never varies (no prompt-logprob prefill in it, say) keeps
    # the profile's value instead of whatever fits the other features best.
    prior_weight: float = 0.01
    adopt: bool = True  # False: refit and report, but the profile's model always plans
    # Size corrections (`SizeCorrections`): each size class's last `size_window` steps; a class
    # is corrected from its `size_min_samples`th. size_window 0: no corrections.
    size_window: int = 64
    size_min_samples: int = 8
    # NOTE: a due refit waits for a step with no online request in the engine, for up to this
    # many more steps: it takes 1-7 ms (two fits, the size corrections measured again, the
    # state file), and run between two online decode steps, every 32nd gap was 3-7 ms longer
    # (P99 4.2 ms against 0.36 at the median), the slowest 3% of the tokens' gaps.
    max_deferred_steps: int = 128

    def __post_init__(self) -> None:
        if not (0 < self.judge_fraction < 1 and self.every >= 1 and self.window >= self.min_samples >= 8
                and self.size_window >= 0 and self.size_min_samples >= 1 and self.max_deferred_steps >= 0):
            raise ValueError(f"bad refit settings: {self}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefitConfig:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RefitStatus:
    """One refit: both models judged on the same newest live steps, and which one plans."""

    profile_error: FitError  # the profile's model on the judged steps
    refit_error: FitError  # the refit (fitted on the older steps) on the same steps
    adopted: bool  # the refit plans from now on (else the profile's model does)
    refit: LatencyModel  # fitted on the whole window
    num_refits: int
    num_steps: int  # live steps seen so far
    tail: TailFactors | None = None  # the tail margins when it ran (`TailMargin`), if kept
    # the size corrections of the model that plans from now on (`SizeCorrections`)
    corrections: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"profile_error": asdict(self.profile_error), "refit_error": asdict(self.refit_error),
                "adopted": self.adopted, "refit": self.refit.to_dict(),
                "num_refits": self.num_refits, "num_steps": self.num_steps,
                "tail": asdict(self.tail) if self.tail is not None else None,
                "corrections": dict(self.corrections)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefitStatus:
        # NOTE: margins and corrections are absent from refits stored before they were kept
        tail = data.get("tail")
        return cls(FitError(**data["profile_error"]), FitError(**data["refit_error"]),
                   bool(data["adopted"]), LatencyModel.from_dict(data["refit"]),
                   int(data["num_refits"]), int(data["num_steps"]),
                   TailFactors(**tail) if tail else None, data.get("corrections") or {})


@dataclass(frozen=True)
class WarmStart:
    """What a server learned live, for the next one on the same profile to plan with from its
    first step: the refit it had adopted (None: it planned with the profile's model), its size
    corrections and the tail margins it had measured. Without it a restarted server plans on
    the idle profile, which under serving load underprices steps by 15-40% on a 2-core host,
    until its first refit (about 80 steps), and on the mean until each step kind's margin
    counts (8 steps). It is never trusted further than that: the first live refit is judged
    against the profile's model alone, and each kind's margin and each size class's
    correction is its live one from its 8th step (a margin for at most `TAIL_MAX_AGE_STEPS`).

        warm = WarmStart.from_status(stored_status)
        LiveModel(profile_model, start=warm.model, corrections=warm.corrections)
        TailMargin(0.9, prior=warm.tail)
    """

    model: LatencyModel | None = None
    tail: TailFactors = TailFactors()
    corrections: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_status(cls, status: RefitStatus) -> WarmStart:
        return cls(status.refit if status.adopted else None, status.tail or TailFactors(),
                   status.corrections)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict() if self.model is not None else None, "tail": asdict(self.tail),
                "corrections": dict(self.corrections)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WarmStart:
        model = data.get("model")
        return cls(LatencyModel.from_dict(model) if model else None, TailFactors(**data["tail"]),
                   data.get("corrections") or {})


class LiveModel:
    """The profile's latency model, refitted from live steps when that predicts them better,
    and corrected by size class (`sized`). `start`: the model to plan with until the first
    refit, `corrections` each class's until it counts (a `WarmStart`'s; None: the profile's)."""

    def __init__(self, profile: LatencyModel, cfg: RefitConfig = RefitConfig(),
                 start: LatencyModel | None = None, corrections: Mapping[str, float] | None = None):
        self.profile, self.cfg = profile, cfg
        self.model = start if start is not None and cfg.adopt else profile  # the one that plans
        self.sizes = (SizeCorrections(cfg.size_window, cfg.size_min_samples, corrections or {})
                      if cfg.adopt and cfg.size_window else None)
        self.status: RefitStatus | None = None
        # NOTE: kept as feature rows, so that a refit is array work only (about a millisecond)
        self._window: deque[tuple[tuple[float, ...], float]] = deque(maxlen=cfg.window)
        self._num_steps = self._num_new = self._num_deferred = 0

    @property
    def sized(self) -> LatencyModel:
        """`model` corrected by size class (`SizeCorrections`): what the planner plans with."""
        return self.sizes.model(self.model) if self.sizes is not None else self.model

    @property
    def refit(self) -> LatencyModel | None:
        """The latest refit, adopted or not (None before the first)."""
        return None if self.status is None else self.status.refit

    def observe(self, sample: Sample, usable: bool = True,
                online_waits: Callable[[], bool] = lambda: False) -> RefitStatus | None:
        """Add one executed step; refit when due. The new status when a refit ran.

        `usable` False: the step's time does not measure its whole shape (it was cut short,
        or its requests aborted), and it is never fitted on; nor are warm-up steps.
        `online_waits()`, asked only when a refit is due: whether an online request is in the
        engine (its next token waits for this call); a due refit then waits for a step
        without one, `cfg.max_deferred_steps` at most.
        """
        self._num_steps += 1
        if usable and self._num_steps > self.cfg.warmup_steps and sample.step_s > 0:
            self._window.append((sample.shape.features(), sample.step_s))
            if self.sizes is not None:
                self.sizes.observe(sample, self.model)
            self._num_new += 1
        if self._num_new < self.cfg.every or len(self._window) < self.cfg.min_samples:
            return None
        if self._num_deferred < self.cfg.max_deferred_steps and online_waits():
            self._num_deferred += 1
            return None
        self._num_new = self._num_deferred = 0
        features, times = zip(*self._window)
        status = self._refit(StepTable.from_rows(features, times))
        self.model = status.refit if status.adopted else self.profile
        corrections = self.sizes.measured(self.model) if self.sizes is not None else {}
        self.status = replace(status, corrections=corrections)
        return self.status

    def _refit(self, samples: StepTable) -> RefitStatus:
        """Fit on the older steps, judge both models on the newest; refit on all of them."""
        num_judged = max(1, round(len(samples) * self.cfg.judge_fraction))
        older, newest = samples.split(len(samples) - num_judged)
        candidate = fit(older, self.profile, self.cfg.prior_weight)
        profile_error, refit_error = evaluate(self.profile, newest), evaluate(candidate, newest)
        adopted = self.cfg.adopt and _better(refit_error, profile_error)
        refit = fit(samples, self.profile, self.cfg.prior_weight)
        num_refits = 1 + (self.status.num_refits if self.status else 0)
        return RefitStatus(profile_error, refit_error, adopted, refit, num_refits, self._num_steps)


class SizeCorrections:
    """Where the linear model is wrong by a step's size, live: per size class
    (`sizes.size_class`), the median of measured over predicted time of its last `window`
    steps, against whichever model plans now (the steps are kept, so that after a refit each
    class is measured against the new model). A class of fewer than `min_samples` steps: its
    `prior` (a `WarmStart`'s), else the median over the last `window` steps of any class
    (`sizes.ALL_STEPS`), else uncorrected.

        sizes = SizeCorrections(64, 8)
        sizes.observe(sample, live_model)      # each usable step
        sizes.model(live_model).predict(shape) # a `sizes.SizedModel`
        sizes.measured(live_model)             # by class, and ALL_STEPS: what a warm start keeps

    NOTE: plain Python, a ratio per step and a median of 64 (9 us): it runs between two
    engine steps, where numpy on the same rows (0.07 ms alone) made the engine core's time
    between steps 0.46 ms longer at the median in `serve` on 2 cores (1.17 against 0.71 ms
    without corrections; 0.81 ms in plain Python).
    """

    def __init__(self, window: int, min_samples: int, prior: Mapping[str, float] | None = None):
        self.window, self.min_samples = window, min_samples
        self._steps: dict[str, deque[tuple[tuple[float, ...], float]]] = {}
        self._ratios: dict[str, deque[float]] = {}  # measured / predicted by `_base`
        self._corrections = dict(prior or {})
        self._stale: set[str] = set()
        self._base: LatencyModel | None = None
        self._sized: SizedModel | None = None

    def observe(self, sample: Sample, model: LatencyModel) -> None:
        """Keep a usable step; `model`: the one that plans now."""
        name = size_class(sample.shape)
        if name is None or not sample.step_s > 0:
            return
        if model is not self._base:
            self._measure_against(model)
        features = sample.shape.features()
        ratio = sample.step_s / _predicted(model, features)
        for key in (name, ALL_STEPS):
            self._steps.setdefault(key, deque(maxlen=self.window)).append((features, sample.step_s))
            self._ratios.setdefault(key, deque(maxlen=self.window)).append(ratio)
            self._stale.add(key)

    def measured(self, model: LatencyModel) -> dict[str, float]:
        """The corrections against `model`, by class and `ALL_STEPS`: what a warm start keeps."""
        self.model(model)
        return dict(self._corrections)

    def model(self, model: LatencyModel) -> SizedModel:
        """`model` with the corrections measured against it."""
        if model is not self._base:
            self._measure_against(model)
        for name in self._stale:
            if len(self._ratios[name]) >= self.min_samples:
                self._corrections[name] = statistics.median(self._ratios[name])
        if self._sized is None or self._stale:
            by_class = {k: v for k, v in self._corrections.items() if k != ALL_STEPS}
            self._sized = SizedModel.of(model, by_class, self._corrections.get(ALL_STEPS, 1.0))
        self._stale = set()
        return self._sized

    def _measure_against(self, model: LatencyModel) -> None:
        self._base, self._sized = model, None
        for name, steps in self._steps.items():
            self._ratios[name] = deque((t / _predicted(model, f) for f, t in steps), maxlen=self.window)
        self._stale = set(self._steps)


def _predicted(model: LatencyModel, features: tuple[float, ...]) -> float:
    return max(model.predict_features(features), 1e-12)


def _better(candidate: FitError, incumbent: FitError) -> bool:
    """Whether `candidate` predicts the same steps better: its median plus P90 relative
    error, the typical step and the tail the budgets are sized against, is lower."""
    return candidate.median_rel + candidate.p90_rel < incumbent.median_rel + incumbent.p90_rel


class TailMargin:
    """How much longer than predicted live steps run, per step kind, at `quantile`: the
    `quantile` of (measured / predicted) over each kind's last `window` steps among the
    server's last `max_age` steps, never below 1. A kind with fewer than `min_samples` of
    them: its `prior` (1 unless a `WarmStart` gives the last server's) for the server's first
    `max_age` steps, then 1. The scheduler plans offline work with it (`policy.TailFactors`),
    so that a step's slow tail, not its mean, stays within the budget.

    NOTE: a factor must age out. Planned against, a high one stops its kind's steps, and with
    them its own measurement: a mixed-step margin of 2.31, carried from server to server by
    warm starts, left no offline token beside an online decode in three rounds of `bench`,
    where the planner, corrected by size class, priced small chunks there within the 5% share.
    Once it ages out, the kind is planned on its prediction again, and its next
    `min_samples` steps measure it anew.

        margin = TailMargin(0.9)
        margin.observe("mixed", predicted_s=0.050, step_s=0.061)   # after every usable step
        margin.factors().mixed                                      # 1.0 .. the P90 ratio
    """

    KINDS = ("online", "mixed", "offline")

    # NOTE: 8, not more: steps of a kind run over their prediction until its factor counts, and
    # a kind the model underprices (a small offline chunk beside online decodes, 1-3 tokens on
    # a CPU, ran 30-60% over in `serve`) stops being planned once it does; every step before
    # that is one an online request pays for. The quantile of 8 is their slowest: cautious.
    # NOTE: the engine's first steps never count, as for the refit (`RefitConfig.warmup_steps`):
    # a server's first step ran 2.2-4.4x its prediction in every run logged (first calls,
    # first allocations), and among a kind's first 8 steps it alone set the factor.
    def __init__(self, quantile: float, window: int = 256, min_samples: int = 8,
                 prior: TailFactors = TailFactors(), warmup_steps: int = RefitConfig.warmup_steps,
                 max_age: int = TAIL_MAX_AGE_STEPS):
        self.quantile, self.min_samples, self.prior = quantile, min_samples, prior
        self.warmup_steps, self.max_age, self.window = warmup_steps, max_age, window
        # (the server's step number, measured / predicted), oldest first; and the same ratios
        # sorted. NOTE: kept sorted as they come and go: factors are read every step, and
        # sorting three windows each time took 0.13 ms of the scheduler's 0.62 per step.
        self._ratios: dict[str, deque[tuple[int, float]]] = {kind: deque() for kind in self.KINDS}
        self._sorted: dict[str, list[float]] = {kind: [] for kind in self.KINDS}
        self._factors = {kind: getattr(prior, kind) for kind in self.KINDS}
        self._stale: set[str] = set()
        self._num_steps = 0

    def observe(self, kind: str, predicted_s: float, step_s: float) -> None:
        self._num_steps += 1
        if self._num_steps > self.warmup_steps and kind in self._ratios and predicted_s > 0 and step_s > 0:
            if len(self._ratios[kind]) == self.window:
                self._drop_oldest(kind)
            ratio = step_s / predicted_s
            self._ratios[kind].append((self._num_steps, ratio))
            bisect.insort(self._sorted[kind], ratio)
            self._stale.add(kind)
        for kind, ratios in self._ratios.items():
            while ratios and self._num_steps - ratios[0][0] >= self.max_age:
                self._drop_oldest(kind)
        if self._num_steps == self.max_age + 1:  # NOTE: the prior ages out
            self._stale.update(self.KINDS)

    def factors(self) -> TailFactors:
        for kind in self._stale:
            self._factors[kind] = self._factor(kind)
        self._stale.clear()
        return TailFactors(**self._factors)

    def _drop_oldest(self, kind: str) -> None:
        _, ratio = self._ratios[kind].popleft()
        ordered = self._sorted[kind]
        del ordered[bisect.bisect_left(ordered, ratio)]
        self._stale.add(kind)

    def _factor(self, kind: str) -> float:
        ratios = self._sorted[kind]
        if len(ratios) < self.min_samples:
            return getattr(self.prior, kind) if self._num_steps <= self.max_age else 1.0
        return max(1.0, ratios[min(len(ratios) - 1, int(self.quantile * len(ratios)))])
