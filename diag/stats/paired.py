"""A measured accuracy drop on the same images with and without a vector: its paired standard error.

With per-image correctness ``b_i`` (reference model, θ_ftᵀ) and ``v_i`` (with the vector) on the
same ``n`` images, accuracies ``a_b = mean(b)``, ``a_v = mean(v)``, the relative drop is

    drop = 1 − a_v / a_b.

Its standard error is the delta method's on the paired images: the influence of image ``i`` is
``ψ_i = (a_v·b_i − a_b·v_i) / a_b²`` (mean 0), so

    se = sqrt(Σ_i ψ_i² / (n (n − 1))).

Only four kinds of image exist — both right (ψ = (a_v − a_b)/a_b²), lost by the vector (b = 1,
v = 0: ψ = a_v/a_b²), gained (b = 0, v = 1: ψ = −1/a_b), both wrong (ψ = 0) — so the se is set by
the discordant images, as in McNemar's test: with no discordant image it is 0, and with
``a_v ≈ a_b`` it is ≈ sqrt((n_lost + n_gained)/(n (n − 1))) / a_b. Because the same images are
scored twice, this is far smaller than the se of two independent accuracies.

A budget decision compares the one-sided upper bound ``drop + z·se`` (z = :data:`UPPER_Z`, 95 %)
with the budget; :func:`images_needed` is the number of images at which the bound would settle
the question at the observed per-image spread: ``n* = ⌈(z·σ / |budget − drop|)²⌉``,
σ² = Σψ_i²/(n − 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from train.errors import DataError

__all__ = ["UPPER_Z", "PairedDrop", "images_needed", "paired_change", "paired_drop"]

#: z of the one-sided 95 % upper confidence bound of a drop.
UPPER_Z = 1.6448536269514722


@dataclass(frozen=True)
class PairedDrop:
    """A relative accuracy drop measured on paired images.

    Attributes:
        drop: 1 − a_v / a_b (NaN when a_b = 0).
        se: its paired standard error (module docstring; NaN below 2 images or when a_b = 0).
        n: images.
        n_lost: images right without the vector and wrong with it.
        n_gained: images wrong without the vector and right with it.
    """

    drop: float
    se: float
    n: int
    n_lost: int
    n_gained: int

    def upper(self, z: float = UPPER_Z) -> float:
        """One-sided upper confidence bound ``drop + z·se``."""
        return self.drop + z * self.se

    def to_dict(self) -> dict:
        return asdict(self)


def paired_drop(correct_ref, correct_new) -> PairedDrop:
    """:class:`PairedDrop` from per-image correctness (0/1 or bool) of the same images, reference first.

    Raises:
        DataError: lengths differ, or values other than 0 and 1.
    """
    b, v = np.asarray(correct_ref, dtype=np.float64).ravel(), np.asarray(correct_new, dtype=np.float64).ravel()
    if b.shape != v.shape:
        raise DataError(f"paired correctness of {b.size} and {v.size} images: the same images are needed")
    if not (np.isin(b, (0.0, 1.0)).all() and np.isin(v, (0.0, 1.0)).all()):
        raise DataError("per-image correctness must be 0 or 1")
    n = int(b.size)
    lost, gained = int(((b == 1) & (v == 0)).sum()), int(((b == 0) & (v == 1)).sum())
    a_b, a_v = (float(b.mean()), float(v.mean())) if n else (math.nan, math.nan)
    if not n or a_b == 0:
        return PairedDrop(math.nan, math.nan, n, lost, gained)
    psi = (a_v * b - a_b * v) / a_b ** 2
    se = math.sqrt(float(psi @ psi) / (n * (n - 1))) if n > 1 else math.nan
    return PairedDrop(1.0 - a_v / a_b, se, n, lost, gained)


def paired_change(ref, new) -> tuple[float, float]:
    """(mean change, its paired standard error) of a per-image quantity measured twice on the same images,
    reference first: the mean of ``new − ref`` and sd/√n of the differences (NaN below 2 images).

    Raises:
        DataError: lengths differ.
    """
    a, b = np.asarray(ref, dtype=np.float64).ravel(), np.asarray(new, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise DataError(f"paired values of {a.size} and {b.size} images: the same images are needed")
    d = b - a
    if not d.size:
        return math.nan, math.nan
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan


def images_needed(drop: float, se: float, n: int, budget: float, z: float = UPPER_Z) -> int | None:
    """Images at which ``drop ± z·se`` would clear ``budget`` at the observed per-image spread.

    σ = se·√n is the per-image spread (set by the discordance rate); the answer is
    ``⌈(z·σ / |budget − drop|)²⌉``. None when it cannot be said: no spread (σ = 0 or NaN) or a
    drop exactly at the budget.
    """
    sigma = se * math.sqrt(n)
    gap = abs(budget - drop)
    if not (math.isfinite(sigma) and sigma > 0 and math.isfinite(gap) and gap > 0):
        return None
    return int(math.ceil((z * sigma / gap) ** 2))
