"""Confidence interval of a binomial proportion (e.g. the coverage of prediction intervals)."""

from __future__ import annotations

import math
from statistics import NormalDist

from train.errors import DataError


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion p̂ = k / n.

    With z the two-sided normal quantile of ``level``:
    centre = (p̂ + z²/2n) / (1 + z²/n), half-width = z·√(p̂(1 − p̂)/n + z²/4n²) / (1 + z²/n).
    It stays inside [0, 1] and keeps its level near p̂ = 0 or 1, where p̂ ± z·√(p̂(1 − p̂)/n) does not.

    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]

    Raises:
        DataError: n < 1, k outside [0, n], or ``level`` outside (0, 1).
    """
    if n < 1 or not 0 <= k <= n:
        raise DataError(f"a proportion needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < level < 1.0:
        raise DataError(f"level must be in (0, 1), got {level}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
