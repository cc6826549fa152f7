"""Step-latency model: predicts how long one engine step takes from the shape of its batch.

Owns the feature set (`FEATURES`), the non-negative least-squares fit on relative error, and
the budget inversions (`max_tokens_within`, `max_decodes_within`) the scheduler plans with.
Plain data and numpy only: it must never import torch or vLLM, and never measure anything
itself; samples come from the caller.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

# NOTE: "mixed" is 1 for a step with both prefill chunks and decodes: such a batch runs the
# prefill and the decode attention paths both, a fixed cost of its own (fitted at 0.2-3.4 ms
# on 2 CPU cores, where a 1-token chunk measured 0.8 ms over the same decodes back to back:
# the term also takes up the other terms' misfit on small decode batches).
FEATURES = ("fixed", "prefill_tokens", "decodes", "decode_attention", "prefill_attention",
            "logprob_tokens", "mixed")
VERSION = 2
DEFAULT_MAX_TOKENS = 1 << 20
# Outlier rejection in `fit`: passes, the cut in robust standard deviations, a floor below
# which no step is an outlier, and the largest share of samples ever dropped.
OUTLIER_PASSES = 4
OUTLIER_MADS = 3.0
OUTLIER_FLOOR = 0.05
MAX_OUTLIER_SHARE = 0.2
DECODE_CONTEXT_BUCKET = 16  # decode steps this close in mean context are one shape (`shape_class`)
T = TypeVar("T")


class StaleModelError(ValueError):
    """A stored latency model of another `VERSION` (other features): it must be measured again."""


@dataclass(frozen=True)
class ChunkShape:
    """One prefill chunk: `num_tokens` new prompt tokens after `num_context` cached ones."""

    num_tokens: int
    num_context: int
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.num_tokens < 0 or self.num_context < 0:
            raise ValueError(f"chunk sizes must be >= 0: {self}")


@dataclass(frozen=True)
class StepShape:
    """The batch of one engine step: prefill chunks plus decode requests (one token each)."""

    prefills: tuple[ChunkShape, ...] = ()
    decode_context_lens: tuple[int, ...] = ()

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)

    @property
    def num_decodes(self) -> int:
        return len(self.decode_context_lens)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decodes

    @property
    def decode_attention(self) -> int:
        return sum(self.decode_context_lens)

    @property
    def prefill_attention(self) -> float:
        return self._twice_prefill_attention / 2

    @property
    def _twice_prefill_attention(self) -> int:
        # NOTE: summed as exact integers (2x the value, halved once), so the value does not
        # depend on chunk order and the budget inversions reproduce it bit for bit.
        return sum(c.num_tokens * (2 * c.num_context + c.num_tokens) for c in self.prefills)

    @property
    def num_logprob_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills if c.prompt_logprobs)

    def features(self) -> tuple[float, ...]:
        """Feature values in `FEATURES` order."""
        return _features(*_counts(self))

    def with_chunk(self, chunk: ChunkShape) -> StepShape:
        return StepShape(self.prefills + (chunk,), self.decode_context_lens)

    def with_decodes(self, context_lens: Sequence[int]) -> StepShape:
        return StepShape(self.prefills, self.decode_context_lens + tuple(context_lens))


def _counts(shape: StepShape) -> tuple[int, int, int, int, int]:
    """`_features`' arguments for `shape`: its sums, computed once."""
    return (shape.num_prefill_tokens, shape.num_decodes, shape.decode_attention,
            shape._twice_prefill_attention, shape.num_logprob_tokens)


def _features(num_prefill_tokens: int, num_decodes: int, decode_attention: int,
              twice_prefill_attention: int, num_logprob_tokens: int) -> tuple[float, ...]:
    return (1.0, float(num_prefill_tokens), float(num_decodes), float(decode_attention),
            twice_prefill_attention / 2, float(num_logprob_tokens),
            float(num_prefill_tokens > 0 and num_decodes > 0))


@dataclass(frozen=True)
class Sample:
    """One measured step: its shape and its wall time in seconds."""

    shape: StepShape
    step_s: float


@dataclass(frozen=True)
class FitError:
    """Relative prediction errors |pred - t| / t over `num_samples` samples."""

    median_rel: float
    p90_rel: float
    max_rel: float
    num_samples: int


@dataclass(frozen=True)
class LatencyModel:
    """t = sum(coefficients[i] * features[i]); coefficients in `FEATURES` order, all >= 0."""

    coefficients: tuple[float, ...]
    fit_error: FitError | None = None

    def __post_init__(self) -> None:
        if len(self.coefficients) != len(FEATURES):
            raise ValueError(f"expected {len(FEATURES)} coefficients, got {len(self.coefficients)}")
        # NOTE: non-negative coefficients make predictions monotone in every feature, which the
        # budget inversions below rely on.
        if not all(math.isfinite(c) and c >= 0 for c in self.coefficients):
            raise ValueError(f"coefficients must be finite and >= 0: {self.coefficients}")

    def predict(self, shape: StepShape) -> float:
        """Predicted step time in seconds."""
        return self.predict_features(shape.features())

    def prefill_attention_s(self, shape: StepShape) -> float:
        """The part of `predict(shape)` its prefill chunks' attention accounts for."""
        return self.coefficients[FEATURES.index("prefill_attention")] * shape.prefill_attention

    def predict_features(self, features: Sequence[float]) -> float:
        """Predicted step time in seconds for a row of `FEATURES` values (`StepShape.features`)."""
        # NOTE: the planner's innermost call (budget inversions, size corrections measured
        # again after a refit); map(mul) sums the same products in the same order as a
        # generator over zip, 3.4 times faster (0.32 against 1.10 us)
        return sum(map(operator.mul, self.coefficients, features))

    def max_tokens_within(self, budget_s: float, base_shape: StepShape, context: int,
                          prompt_logprobs: bool = False,
                          max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
        """Largest n <= max_tokens such that base + one n-token chunk at `context` fits."""
        _, c_p, _, _, c_ap, c_l, c_m = self.coefficients
        # NOTE: the base shape's sums, once: predict_n runs a few times for each request
        num_prefill, num_decodes, attention, twice_prefill_attention, num_logprob = _counts(base_shape)
        slope = c_p + c_ap * context + (c_l if prompt_logprobs else 0.0)
        joins = c_m if num_decodes and not num_prefill else 0.0  # the first chunk beside decodes
        estimate = _solve_quadratic(c_ap / 2, slope, budget_s - self.predict(base_shape) - joins)

        def predict_n(n: int) -> float:
            return self.predict_features(_features(
                num_prefill + n, num_decodes, attention, twice_prefill_attention + n * (2 * context + n),
                num_logprob + (n if prompt_logprobs else 0)))

        return _largest_within(predict_n, budget_s, estimate, max_tokens)

    def max_decodes_within(self, budget_s: float, base_shape: StepShape, context_len: int,
                           max_decodes: int = DEFAULT_MAX_TOKENS) -> int:
        """Largest k <= max_decodes such that base + k decodes of `context_len` fits."""
        _, _, c_d, c_ad, _, _, c_m = self.coefficients
        num_prefill, num_decodes, attention, twice_prefill_attention, num_logprob = _counts(base_shape)
        joins = c_m if num_prefill and not num_decodes else 0.0  # the first decode beside chunks
        estimate = _solve_quadratic(0.0, c_d + c_ad * context_len,
                                    budget_s - self.predict(base_shape) - joins)

        def predict_k(k: int) -> float:
            return self.predict_features(_features(
                num_prefill, num_decodes + k, attention + k * context_len, twice_prefill_attention,
                num_logprob))

        return _largest_within(predict_k, budget_s, estimate, max_decodes)

    def to_dict(self) -> dict[str, Any]:
        fit_error = None if self.fit_error is None else asdict(self.fit_error)
        return {"version": VERSION, "features": list(FEATURES),
                "coefficients": list(self.coefficients), "fit_error": fit_error}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyModel:
        if data.get("version") != VERSION or tuple(data.get("features", ())) != FEATURES:
            raise StaleModelError(f"stored latency model has version {data.get('version')!r} and "
                                  f"features {data.get('features')!r}; expected {VERSION}, {FEATURES}")
        fit_error = data.get("fit_error")
        return cls(tuple(float(c) for c in data["coefficients"]),
                   None if fit_error is None else FitError(**fit_error))


def _solve_quadratic(a: float, b: float, slack: float) -> float:
    """Largest real x >= 0 with a*x^2 + b*x <= slack (inf if unbounded, -1 if none)."""
    if slack < 0:
        return -1.0
    # NOTE: 2s / (b + sqrt(b^2 + 4as)) is the root without cancellation when a is tiny.
    denominator = b + math.sqrt(b * b + 4 * a * slack)
    return math.inf if denominator == 0 else 2 * slack / denominator


def _largest_within(predict_n: Callable[[int], float], budget_s: float, estimate: float,
                    max_n: int) -> int:
    """Integer n in [0, max_n] with predict_n(n) <= budget < predict_n(n + 1), from an estimate."""
    def fits(n: int) -> bool:
        return predict_n(n) <= budget_s

    if not fits(0):
        return 0
    # NOTE: the closed form is exact only up to rounding, so the answer comes from integer
    # checks: gallop out from the estimate to bracket it, then bisect (O(log error) checks).
    lo, hi, step = 0, max_n + 1, 1  # invariant: fits(lo), and hi == max_n + 1 or not fits(hi)
    guess = int(min(max(estimate, 0.0), max_n))
    if fits(guess):
        lo = guess
        while lo + step < hi and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(hi, lo + step)
    else:
        hi = guess
        while hi - step > lo and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(lo, hi - step)
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The last n in [lo, hi) that fits, given fits(lo) and that hi does not."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class StepTable:
    """Samples as arrays, one row of `FEATURES` values and one time per step: what `fit` and
    `evaluate` compute on (the live refit keeps its window in this form)."""

    features: np.ndarray  # (n, len(FEATURES))
    times: np.ndarray  # (n,) seconds

    @classmethod
    def of(cls, samples: Sequence[Sample] | StepTable) -> StepTable:
        if isinstance(samples, StepTable):
            return samples
        return cls.from_rows([s.shape.features() for s in samples], [s.step_s for s in samples])

    @classmethod
    def from_rows(cls, features: Sequence[Sequence[float]], times: Sequence[float]) -> StepTable:
        return cls(np.array(features, dtype=float).reshape(-1, len(FEATURES)),
                   np.array(times, dtype=float))

    def __len__(self) -> int:
        return len(self.times)

    def split(self, index: int) -> tuple[StepTable, StepTable]:
        """(rows before `index`, rows from it on)."""
        return (StepTable(self.features[:index], self.times[:index]),
                StepTable(self.features[index:], self.times[index:]))


def fit(samples: Sequence[Sample] | StepTable, prior: LatencyModel | None = None,
        prior_weight: float = 0.0) -> LatencyModel:
    """Non-negative least squares on relative error (each row weighted by 1 / step_s), with
    outlier rejection; `prior` (weight per sample) pulls each coefficient toward its value.

    NOTE: outliers are rejected rather than averaged away: on a shared CPU a step is slowed,
    never sped up, by another process, so the misses are one-sided and a squared loss would
    let a few 30%-slow steps raise every coefficient. Each pass drops the samples whose
    relative residual is more than OUTLIER_MADS robust standard deviations (1.4826 x MAD)
    from the median residual, never one within OUTLIER_FLOOR of the fit and never more than
    MAX_OUTLIER_SHARE of the samples; it works on live steps too, where no shape repeats
    exactly (decode contexts grow every step), which a median over repeats would need.
    """
    table = StepTable.of(samples)
    if len(table) < len(FEATURES):
        raise ValueError(f"need at least {len(FEATURES)} samples to fit {len(FEATURES)} "
                         f"coefficients, got {len(table)}")
    if not np.all(np.isfinite(table.times) & (table.times > 0)):
        raise ValueError("every sample needs a finite step_s > 0")
    design = table.features / table.times[:, None]
    kept = np.ones(len(table), dtype=bool)
    for _ in range(OUTLIER_PASSES):
        coefficients = _solve_relative(design[kept], prior, prior_weight * kept.sum())
        residuals = design @ coefficients - 1.0
        keep_next = _inliers(residuals)
        if (keep_next == kept).all():
            break
        kept = keep_next
    model = LatencyModel(tuple(float(max(c, 0.0)) for c in coefficients))
    return LatencyModel(model.coefficients, evaluate(model, table))


def _inliers(residuals: np.ndarray) -> np.ndarray:
    """Samples whose relative residual is not an outlier (see `fit`)."""
    center = np.median(residuals)
    distance = np.abs(residuals - center)
    cutoff = max(OUTLIER_MADS * 1.4826 * float(np.median(distance)), OUTLIER_FLOOR)
    # NOTE: whatever the spread, at most the worst MAX_OUTLIER_SHARE go (ties at the cap stay).
    cap = float(np.quantile(distance, 1 - MAX_OUTLIER_SHARE, method="higher"))
    return distance <= max(cutoff, cap)


def _solve_relative(design: np.ndarray, prior: LatencyModel | None,
                    weight: float) -> np.ndarray:
    """min sum (design @ c - 1)^2 + weight * sum_j (c_j / prior_j - 1)^2 over c >= 0, where
    the prior is > 0 (a zero prior coefficient is not pulled on)."""
    rows, targets = design, np.ones(len(design))
    if prior is not None and weight > 0:
        pulled = [j for j, c in enumerate(prior.coefficients) if c > 0]
        penalty = np.zeros((len(pulled), len(FEATURES)))
        for i, j in enumerate(pulled):
            penalty[i, j] = math.sqrt(weight) / prior.coefficients[j]
        rows = np.vstack([design, penalty])
        targets = np.concatenate([targets, np.full(len(pulled), math.sqrt(weight))])
    # NOTE: features span ~10 orders of magnitude; scaling columns keeps NNLS well conditioned.
    scale = np.abs(rows).max(axis=0)
    scale[scale == 0] = 1.0
    return _solve_nnls(rows / scale, targets) / scale


def evaluate(model: LatencyModel, samples: Sequence[Sample] | StepTable) -> FitError:
    """Median, P90 and max of |predicted - measured| / measured over `samples`."""
    table = StepTable.of(samples)
    if not len(table):
        raise ValueError("cannot evaluate a latency model on zero samples")
    rel = np.abs(table.features @ np.array(model.coefficients) - table.times) / table.times
    return FitError(float(np.median(rel)), float(np.percentile(rel, 90)), float(rel.max()),
                    len(table))


def evaluate_shapes(model: LatencyModel, samples: Sequence[Sample]) -> FitError:
    """`evaluate` once per batch shape (`shape_class`), against the median of its steps.

    NOTE: one step of a shape can run 20% slower or faster than the next on a busy CPU (prompt
    logprobs especially); the model predicts a shape's typical time, so a shape measured
    several times is judged by its median, and counts once.
    """
    return evaluate(model, shape_medians(samples))


def shape_class(shape: StepShape) -> tuple:
    """What makes two steps the same batch shape: the same prefill chunks and decode count,
    and decode contexts that differ by less than DECODE_CONTEXT_BUCKET tokens on average.

    NOTE: a decode batch's contexts grow by one every step, so its steps never repeat exactly;
    a few tokens of context change its time by far less than a busy host's noise does, and
    grouping them lets the median of several steps stand for the shape.
    """
    num = shape.num_decodes
    return shape.prefills, num, round(shape.decode_attention / num / DECODE_CONTEXT_BUCKET) if num else 0


def shape_medians(samples: Sequence[Sample]) -> list[Sample]:
    """One sample per `shape_class`: its first step's shape, at the median time of its steps."""
    classes: dict[tuple, list[Sample]] = {}
    for sample in samples:
        classes.setdefault(shape_class(sample.shape), []).append(sample)
    return [Sample(steps[0].shape, float(np.median([s.step_s for s in steps])))
            for steps in classes.values()]


def shape_spread(samples: Sequence[Sample]) -> list[float]:
    """Each step's |t - m| / t, m the median time of the steps of its shape (`shape_class`),
    for shapes measured more than once: the error of predicting every step by its own shape's
    median, below which no model of a step's shape can go (on a busy 2-core host, identical
    one-decode steps spread 20% at P90, serving online traffic alone)."""
    classes: dict[tuple, list[float]] = {}
    for sample in samples:
        classes.setdefault(shape_class(sample.shape), []).append(sample.step_s)
    return [abs(t - median) / t for times in classes.values() if len(times) > 1
            for median in [float(np.median(times))] for t in times]


def split_holdout(samples: Sequence[T], fraction: float = 0.25,
                  seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic (train, holdout) split of samples (or of any items); each keeps the order."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(samples))
    held = set(order[:round(len(samples) * fraction)].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    return train, [s for i, s in enumerate(samples) if i in held]


def _solve_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        from scipy.optimize import nnls
    except ImportError:
        return _nnls_lawson_hanson(a, b)
    return nnls(a, b)[0]


def _nnls_lawson_hanson(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson & Hanson, 1974): the fallback without scipy."""
    num_cols = a.shape[1]
    x, active = np.zeros(num_cols), np.zeros(num_cols, dtype=bool)
    for _ in range(3 * num_cols + 10):
        gradient = a.T @ (b - a @ x)
        if active.all() or gradient[~active].max() <= tol:
            break
        active[np.argmax(np.where(active, -np.inf, gradient))] = True
        x = _nnls_inner(a, b, x, active)
    return x


def _nnls_inner(a: np.ndarray, b: np.ndarray, x: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Solve on the active set, stepping back toward x until the solution is feasible."""
    while True:
        z = np.zeros_like(x)
        z[active] = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if z[active].min() > 0:
            return z
        blocked = active & (z <= 0)
        alpha = np.min(x[blocked] / np.maximum(x[blocked] - z[blocked], 1e-300))
        x = x + alpha * (z - x)
        # NOTE: shrinks the caller's active set in place; at least one index leaves per pass.
        active &= x > 1e-15
        if not active.any():
            return np.zeros_like(x)
