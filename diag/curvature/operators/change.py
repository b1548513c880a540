"""A loss change over images: its mean, its paired standard error, and its two alternate-image halves."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["LossChange"]


def _mean_and_se(mean: float, mean_sq: float, n: int) -> tuple[float, float]:
    """(mean, its standard error sd/√n with the n − 1 variance) from a per-image quantity's mean and mean square."""
    var = max(mean_sq - mean * mean, 0.0) * n / max(n - 1, 1)
    return mean, (var / n) ** 0.5 if n > 1 else float("nan")


@dataclass(frozen=True)
class LossChange:
    """A measured loss change ``L(θ + δ) − L(θ)`` over N images: mean, paired se, and the two alternate-image halves."""

    mean: float
    se: float
    half_a: float
    half_b: float
    n: int

    @classmethod
    def from_moments(cls, m: Tensor, n: int) -> "LossChange":
        """From the per-image means (Σd, Σd², Σd over even images, their count, Σd over odd) ÷ N."""
        mean, sq, even_sum, even_share, odd_sum = (float(v) for v in m)
        odd_share = 1.0 - even_share
        return cls(*_mean_and_se(mean, sq, n), even_sum / even_share if even_share > 0 else float("nan"),
                   odd_sum / odd_share if odd_share > 0 else float("nan"), n)
