"""Paired comparison of two runs, document by document: Δ, a confidence interval and p.

For 0/1 metrics (accuracy, exact match) p is McNemar's exact test: under "no change" the
documents that flipped are equally likely to flip either way (`scipy.stats.binomtest` on the
discordant pairs). For other metrics p comes from a paired bootstrap of the mean difference
(`scipy.stats.bootstrap` with `paired=True`), centred on the null. The interval is the paired
bootstrap's percentile interval for both. Seeded, so a report is reproducible. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
NUM_RESAMPLES = 9999
SEED = 0


@dataclass(frozen=True)
class Comparison:
    """current − reference over the documents both runs scored."""

    test: str  # "mcnemar" or "bootstrap"
    num_paired: int
    delta: float
    ci_low: float
    ci_high: float
    p: float
    num_better: int  # documents scored higher now than in the reference
    num_worse: int


def compare_paired(current: dict, reference: dict, confidence: float = CONFIDENCE,
                   num_resamples: int = NUM_RESAMPLES, seed: int = SEED) -> Comparison | None:
    """Pair two runs' per-document values by key ((task, doc_id)); None if none are shared."""
    keys = sorted(current.keys() & reference.keys())
    if not keys:
        return None
    x = np.array([current[k] for k in keys], dtype=float)
    y = np.array([reference[k] for k in keys], dtype=float)
    diff = x - y
    delta = float(diff.mean())
    better, worse = int((diff > 0).sum()), int((diff < 0).sum())
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    if np.all(diff == diff[0]):  # NOTE: scipy's bootstrap refuses a distribution of one value
        low = high = delta
        p = 1.0 if delta == 0 else 1.0 / (num_resamples + 1)
    else:
        boot = _paired_bootstrap(x, y, confidence, num_resamples, seed)
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
        p = _bootstrap_p(boot.bootstrap_distribution, delta)
    if binary:
        return Comparison("mcnemar", len(keys), delta, low, high, mcnemar_p(better, worse), better, worse)
    return Comparison("bootstrap", len(keys), delta, low, high, p, better, worse)


def mcnemar_p(num_better: int, num_worse: int) -> float:
    """McNemar's exact two-sided p from the discordant pairs (1.0 when there are none)."""
    from scipy.stats import binomtest

    if num_better + num_worse == 0:
        return 1.0
    return float(binomtest(num_better, num_better + num_worse, 0.5).pvalue)


def _paired_bootstrap(x: np.ndarray, y: np.ndarray, confidence: float, num_resamples: int, seed: int):
    from scipy.stats import bootstrap

    def mean_difference(a, b, axis=-1):
        return a.mean(axis=axis) - b.mean(axis=axis)

    return bootstrap((x, y), mean_difference, paired=True, vectorized=True, method="percentile",
                     confidence_level=confidence, n_resamples=num_resamples,
                     rng=np.random.default_rng(seed))


def _bootstrap_p(distribution: np.ndarray, delta: float) -> float:
    """Two-sided p of "no difference": how often the resampled Δ, shifted by the observed Δ,
    lands at least as far from 0 as the observed Δ (with the +1 of a Monte Carlo p)."""
    shifted = np.abs(distribution - delta)
    return float((1 + (shifted >= abs(delta)).sum()) / (len(distribution) + 1))
