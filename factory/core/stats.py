"""Statistics that several commands share: the logistic function, a quantile and a bootstrap interval.

Pure functions of floats, no files, no models; judge-eval, the policy's win rate, the judge schedule and the
scripted backend all read their figures through these, so each figure is computed one way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def sigmoid(x: float) -> float:
    """The logistic function 1 / (1 + e^-x), without overflow for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (resampling cases with replacement, seeded)."""
    if not values:
        return (math.nan, math.nan)
    if resamples <= 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return quantile(means, tail), quantile(means, 1 - tail)
