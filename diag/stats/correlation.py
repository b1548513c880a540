"""Pearson and Spearman correlations with naive t-test p-values, and the pair-table helpers.

The naive p-value assumes independent pairs (the preprint's Appendix C reports it); pairs
that share a domain are not independent, see :mod:`diag.stats.bootstrap` and
:mod:`diag.stats.permutation`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from train.errors import DataError, unknown

log = logging.getLogger(__name__)


def rankdata(x) -> np.ndarray:
    """Average ranks (ties share their mean rank), 1-based: ``scipy.stats.rankdata``.

    scipy.stats takes seconds to import, so it is loaded on the first call, not with the package.
    """
    from scipy.stats import rankdata as _rankdata

    return _rankdata(x)

#: Appendix C of the preprint, 56 pairs, Pearson r with naive p < 0.01:
#: (x column, y column, paper's r).  Figure 6(a) plots cos(tau*^S, tau*^T) against E-RMSE,
#: 6(b) cos(tau*^S, tau*^T) against cos(tau_ft^S, tau_ft^T), 6(c) cos(tau_ft) against E-RMSE.
#: Pearson's r is symmetric, so the order of x and y only matters for the figure axes.
APPENDIX_C: list[tuple[str, str, float]] = [
    ("cos_star", "ermse", -0.51),
    ("cos_star", "cos_ft", 0.73),
    ("cos_ft", "ermse", -0.32),
]

_METHODS = ("pearson", "spearman")


@dataclass(frozen=True)
class CorrelationResult:
    """A correlation coefficient with its two-sided p-value (like ``scipy.stats.pearsonr``).

    Attributes:
        statistic: Pearson r or Spearman rho.
        pvalue: two-sided p-value of H0: no correlation, from the t distribution with n - 2
            degrees of freedom (exact for Pearson under bivariate normality, the same formula
            scipy uses for Spearman).  It assumes independent observations.
        n: number of (x, y) observations used.
        method: ``"pearson"`` or ``"spearman"``.
    """

    statistic: float
    pvalue: float
    n: int
    method: str = "pearson"

    def __repr__(self) -> str:
        return f"CorrelationResult({self.method}: r={self.statistic:.4f}, p={self.pvalue:.3g}, n={self.n})"

    def to_dict(self) -> dict:
        return {"method": self.method, "statistic": self.statistic, "pvalue": self.pvalue, "n": self.n}


def _as_pair_arrays(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise DataError(f"x and y must have the same length, got {x.size} and {y.size}")
    return x, y


def _pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    yc = y - y.mean()
    sxx = float(xc @ xc)
    syy = float(yc @ yc)
    if sxx == 0.0 or syy == 0.0:
        raise DataError("correlation is undefined: x or y is constant")
    r = float(xc @ yc) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def _t_pvalue(r: float, n: int) -> float:
    """Two-sided p of H0: rho = 0 with t = r sqrt((n-2)/(1-r^2)) ~ t_{n-2}.

    Closed form: p = I_{1-r^2}((n-2)/2, 1/2), the regularised incomplete beta function
    (identical to scipy's beta-distribution formulation).
    """
    if abs(r) >= 1.0:
        return 0.0
    from scipy import special

    return float(special.betainc((n - 2) / 2.0, 0.5, 1.0 - r * r))


def _check_n(n: int) -> None:
    if n < 3:
        raise DataError(f"a correlation needs at least 3 complete (x, y) pairs, got {n}")


def pearson(x, y) -> CorrelationResult:
    """Pearson's product-moment correlation and its two-sided t-test p-value.

    r = Σ (x_i - x̄)(y_i - ȳ) / sqrt(Σ (x_i - x̄)² Σ (y_i - ȳ)²), accumulated in float64;
    p = I_{1-r²}((n-2)/2, 1/2).  Matches ``scipy.stats.pearsonr``.

    Args:
        x, y: equal-length sequences of numbers without NaN.

    Returns:
        CorrelationResult with method ``"pearson"``.

    Raises:
        DataError: fewer than 3 pairs, NaN values, or a constant input.

    >>> round(pearson([1, 2, 3], [1, 3, 2]).statistic, 12)
    0.5
    """
    x, y = _as_pair_arrays(x, y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("x and y must be finite; drop missing pairs first")
    _check_n(x.size)
    r = _pearson_r(x, y)
    return CorrelationResult(statistic=r, pvalue=_t_pvalue(r, x.size), n=int(x.size), method="pearson")


def spearman(x, y) -> CorrelationResult:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share ranks).

    The p-value uses the same t approximation with n - 2 degrees of freedom as
    ``scipy.stats.spearmanr``.

    Raises:
        DataError: fewer than 3 pairs, NaN values, or a constant input.
    """
    x, y = _as_pair_arrays(x, y)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("x and y must be finite; drop missing pairs first")
    _check_n(x.size)
    r = _pearson_r(rankdata(x), rankdata(y))
    return CorrelationResult(statistic=r, pvalue=_t_pvalue(r, x.size), n=int(x.size), method="spearman")


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise unknown("correlation method", method, _METHODS)


def _check_columns(df: pd.DataFrame, cols) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"pair table lacks column(s) {', '.join(missing)}; has {', '.join(map(str, df.columns))}")


def complete_pairs(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows of a pair table with finite ``x`` and ``y`` and source != target."""
    _check_columns(df, ["source", "target", x, y])
    out = df[["source", "target", x, y]].copy()
    out[x] = pd.to_numeric(out[x], errors="coerce")
    out[y] = pd.to_numeric(out[y], errors="coerce")
    keep = np.isfinite(out[x].to_numpy(float)) & np.isfinite(out[y].to_numpy(float))
    keep &= (out["source"] != out["target"]).to_numpy()
    return out.loc[keep].reset_index(drop=True)


def _grid(pairs: pd.DataFrame, x: str, y: str):
    """Source × target matrices of x and y (NaN where the pair is absent)."""
    sources = sorted(pairs["source"].unique())
    targets = sorted(pairs["target"].unique())
    si = {s: i for i, s in enumerate(sources)}
    ti = {t: i for i, t in enumerate(targets)}
    X = np.full((len(sources), len(targets)), np.nan)
    Y = np.full_like(X, np.nan)
    for s, t, xv, yv in pairs[["source", "target", x, y]].itertuples(index=False):
        X[si[s], ti[t]] = xv
        Y[si[s], ti[t]] = yv
    return sources, targets, X, Y
