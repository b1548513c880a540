"""Jackknife+ / CV+ prediction intervals from leave-one-unit-out fits (Barber, Candès, Ramdas and Tibshirani,
*Predictive inference with the jackknife+*, Ann. Statist. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from train.errors import DataError


def jackknife_plus(centres: np.ndarray, residuals: Sequence[np.ndarray], level: float) -> tuple[np.ndarray, np.ndarray]:
    """Jackknife+ interval of each new point from n leave-one-unit-out fits.

    Unit i (i = 1…n) was held out of fit μ₋ᵢ; ``residuals[i]`` holds its mᵢ held-out residuals
    Rᵢⱼ = |yᵢⱼ − μ₋ᵢ(xᵢⱼ)| and ``centres[:, i]`` the predictions μ₋ᵢ(x) of the new points. Each
    unit weighs one: wᵢⱼ = 1/mᵢ. With α = 1 − level and t = (1 − α)(n + 1):

        lo(x) = max{v : Σᵢⱼ wᵢⱼ·1[μ₋ᵢ(x) − Rᵢⱼ ≥ v] ≥ t},
        hi(x) = min{v : Σᵢⱼ wᵢⱼ·1[μ₋ᵢ(x) + Rᵢⱼ ≤ v] ≥ t}.

    With one residual per unit these are the ⌊α(n+1)⌋-th smallest of μ₋ᵢ(x) − Rᵢ and the
    ⌈(1−α)(n+1)⌉-th smallest of μ₋ᵢ(x) + Rᵢ: for exchangeable units P(y ∈ [lo, hi]) ≥ 1 − 2α,
    in practice ≈ 1 − α (units of several points: the guarantee holds for one point drawn at random
    per unit; the weights average that draw). When n < t the bounds are ∓∞ (too few units for the
    level: n ≥ level/(1 − level) is needed, 4 at 80 %).

    Args:
        centres: (m, n) predictions of the m new points by the n leave-one-out fits.
        residuals: n arrays, the held-out absolute residuals of each unit (each non-empty).
        level: nominal level 1 − α, in (0, 1).

    Returns:
        (lo, hi), each of shape (m,).

    Raises:
        DataError: ``level`` outside (0, 1), an empty unit, or ``centres`` not of n columns.
    """
    if not 0.0 < level < 1.0:
        raise DataError(f"level must be in (0, 1), got {level}")
    centres = np.atleast_2d(np.asarray(centres, dtype=np.float64))
    n = len(residuals)
    if centres.shape[1] != n:
        raise DataError(f"centres have {centres.shape[1]} columns for {n} units")
    if any(len(r) == 0 for r in residuals):
        raise DataError("every unit needs at least one held-out residual")
    m = centres.shape[0]
    t = level * (n + 1)
    if n == 0 or t > n + 1e-9:
        return np.full(m, -np.inf), np.full(m, np.inf)
    r = np.concatenate([np.abs(np.asarray(x, dtype=np.float64)) for x in residuals])
    w = np.concatenate([np.full(len(x), 1.0 / len(x)) for x in residuals])
    unit = np.repeat(np.arange(n), [len(x) for x in residuals])
    return (_bound(centres[:, unit] - r, w, t, ascending=False), _bound(centres[:, unit] + r, w, t, ascending=True))


def _bound(values: np.ndarray, w: np.ndarray, t: float, ascending: bool) -> np.ndarray:
    """Per row, the first value (in the given order) at which the running weight reaches ``t``."""
    order = np.argsort(values if ascending else -values, axis=1, kind="stable")
    cum = np.cumsum(w[order], axis=1)
    first = np.argmax(cum >= t - 1e-9, axis=1)
    return np.take_along_axis(np.take_along_axis(values, order, axis=1), first[:, None], axis=1)[:, 0]
