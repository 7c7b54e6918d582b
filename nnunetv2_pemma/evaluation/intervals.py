"""Bootstrap intervals over cases, and claims decided on them: HOLDS, FAILS or INCONCLUSIVE.

A Table 2 cell is a mean over cases; its 95 % interval is SciPy's percentile bootstrap over those cases. A claim
compares two cells scored on the same cases (CP against C of one model; a model after an update against before
it), so it is decided on the per-case differences (a paired bootstrap): the claim holds when the whole interval
of the mean difference lies on its side of the margin, fails when the whole interval lies on the other side,
and is inconclusive otherwise. Resampling uses a generator with a fixed seed, so the same scores give the same
intervals.

Resampling cases says nothing of another training's outcome: a model trained with another seed can move a
difference by more than its interval over cases. `with_seed_spread` widens an interval by a measured seed-to-seed
spread, so that one run decides only what a rerun with another seed would not overturn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap, norm

LEVEL = 0.95
N_RESAMPLES = 2000
SEED = 0
Z = float(norm.ppf(0.5 + LEVEL / 2))  # 1.96

HOLDS, FAILS, INCONCLUSIVE, MEASURED = "HOLDS", "FAILS", "INCONCLUSIVE", "MEASURED"


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` cases with its bootstrap interval (NaN where undefined: no case, or one)."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return self.format("+.2f")

    def format(self, spec: str = ".2f") -> str:
        """`mean [low, high] (n=N)` with each number in format `spec` (signed for differences: "+.2f")."""
        if math.isnan(self.mean):
            return "–"
        if math.isnan(self.low):
            return f"{self.mean:{spec}} (n={self.n})"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}] (n={self.n})"


def mean_interval(values: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Estimate:
    """Mean of the defined values and its percentile bootstrap interval (undefined values, NaN, are left out: a
    Dice where neither the reference nor the prediction holds the structure)."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(data) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if len(data) == 1 or np.all(data == data[0]):  # no spread to resample
        low = high = float(data[0]) if len(data) > 1 else math.nan
        return Estimate(float(data.mean()), low, high, len(data))
    result = bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=LEVEL, method="percentile",
                       rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return Estimate(float(data.mean()), float(ci.low), float(ci.high), len(data))


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], n_resamples: int = N_RESAMPLES,
                      seed: int = SEED) -> Estimate:
    """Mean over the cases both define of a[case] - b[case], with its bootstrap interval (resampling cases)."""
    cases = sorted(c for c in set(a) & set(b) if not (math.isnan(a[c]) or math.isnan(b[c])))
    return mean_interval([a[c] - b[c] for c in cases], n_resamples, seed)


def with_seed_spread(difference: Estimate, spread: float) -> Estimate:
    """The interval widened by `spread`, the standard deviation of this difference between training seeds: each
    side's half-width and Z * spread added in quadrature (independent errors from the cases and the training)."""
    if spread <= 0 or math.isnan(difference.low):
        return difference
    extra = Z * spread
    return Estimate(difference.mean, difference.mean - math.hypot(difference.mean - difference.low, extra),
                    difference.mean + math.hypot(difference.high - difference.mean, extra), difference.n)


def verdict(difference: Estimate, margin: float = 0.0) -> str:
    """HOLDS when the interval of the difference lies above -margin (0: a strict improvement; a positive margin:
    not worse than that), FAILS when it lies below, INCONCLUSIVE when it straddles it or is undefined."""
    if math.isnan(difference.low):
        return INCONCLUSIVE
    if difference.low > -margin:
        return HOLDS
    if difference.high < -margin:
        return FAILS
    return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of several comparisons: it fails if one fails, holds if all hold, else is inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if FAILS in verdicts:
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE
