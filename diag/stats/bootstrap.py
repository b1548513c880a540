"""Two-way (source × target) cluster bootstrap confidence interval of a pair-table correlation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from diag.stats.correlation import _check_method, _check_n, _grid, _pearson_r, complete_pairs, rankdata
from train.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile confidence interval from a two-way (source × target) cluster bootstrap.

    Unpacks like a tuple: ``lo, hi = pair_bootstrap_ci(...)``.

    Attributes:
        lo, hi: percentile bounds at ``level``.
        stderr: standard deviation of the bootstrap replicates (bootstrap standard error).
        n_boot: resamples requested; n_skipped: degenerate ones dropped (fewer than 3 pairs
            or zero variance); the interval uses ``n_boot - n_skipped`` replicates.
    """

    lo: float
    hi: float
    level: float
    method: str
    n_boot: int
    n_skipped: int
    stderr: float

    def __iter__(self):
        return iter((self.lo, self.hi))

    def __repr__(self) -> str:
        return (f"BootstrapCI({self.method} {self.level:.0%}: [{self.lo:.4f}, {self.hi:.4f}], "
                f"se={self.stderr:.4f}, n_boot={self.n_boot}, skipped={self.n_skipped})")

    def to_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "level": self.level, "method": self.method,
                "n_boot": self.n_boot, "n_skipped": self.n_skipped, "stderr": self.stderr}


def _weighted_pearson(X: np.ndarray, Y: np.ndarray, W: np.ndarray, var_x: float, var_y: float) -> np.ndarray:
    """Pearson r of each resample b with integer weights W[b] (= row replication).

    NaN for degenerate resamples: fewer than 3 pairs, or a variance below 1e-12 times the
    variance of the full sample (a constant column up to rounding).
    """
    n = W.sum(axis=1)
    safe_n = np.where(n > 0, n, 1.0)
    mx = (W * X).sum(axis=1) / safe_n
    my = (W * Y).sum(axis=1) / safe_n
    xc = X - mx[:, None]
    yc = Y - my[:, None]
    sxy = (W * xc * yc).sum(axis=1)
    sxx = (W * xc * xc).sum(axis=1)
    syy = (W * yc * yc).sum(axis=1)
    degenerate = (n < 3) | (sxx <= 1e-12 * var_x * safe_n) | (syy <= 1e-12 * var_y * safe_n)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sxy / np.sqrt(sxx * syy)
    r[degenerate] = np.nan
    return np.clip(r, -1.0, 1.0)


def _replicates(xv: np.ndarray, yv: np.ndarray, idx: np.ndarray, ns: int, nt: int, method: str, n_boot: int,
                rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` correlations of the pairs ``idx`` (flat into the ns × nt grid) reweighted by
    (#draws of s) × (#draws of t); NaN for a degenerate resample."""
    reps = np.full(n_boot, np.nan)
    chunk = 256
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        cs = np.stack([np.bincount(rng.integers(0, ns, ns), minlength=ns) for _ in range(m)])
        ct = np.stack([np.bincount(rng.integers(0, nt, nt), minlength=nt) for _ in range(m)])
        W = (cs[:, :, None] * ct[:, None, :]).reshape(m, -1)[:, idx].astype(np.float64)
        if method == "pearson":
            reps[start:start + m] = _weighted_pearson(xv[None, :], yv[None, :], W, float(np.var(xv)), float(np.var(yv)))
            continue
        for b in range(m):
            w = W[b].astype(np.int64)
            if w.sum() < 3:
                continue
            xr, yr = np.repeat(xv, w), np.repeat(yv, w)
            if np.ptp(xr) == 0 or np.ptp(yr) == 0:
                continue
            reps[start + b] = _pearson_r(rankdata(xr), rankdata(yr))
    return reps


def pair_bootstrap_ci(df: pd.DataFrame, x: str, y: str, method: str = "pearson", n_boot: int = 2000,
                      seed: int = 0, level: float = 0.95) -> BootstrapCI:
    """Two-way cluster bootstrap CI of a correlation over (source, target) pairs.

    Each resample draws the source domains with replacement (as many as there are sources)
    and, independently, the target domains with replacement; it keeps every pair (s, t) of
    the table with s drawn and t drawn and s != t, with multiplicity (#draws of s) ×
    (#draws of t), and recomputes the correlation on that multiset.  This reproduces the
    variance contributed by a source (or target) effect shared by all its pairs, which a
    naive i.i.d. pair bootstrap — and the t-test p-value — ignore.  Resamples with fewer than
    3 pairs or a constant x or y are skipped and counted.  The interval is the percentile
    interval of the remaining replicates.

    Args:
        df: pair table with columns ``source``, ``target``, ``x``, ``y``; rows with NaN in
            x or y, or with source == target, are ignored.
        x, y: column names.
        method: ``"pearson"`` or ``"spearman"``.
        n_boot: number of resamples.
        seed: seed of a ``numpy.random.default_rng``.
        level: confidence level.

    Returns:
        BootstrapCI (unpacks to ``(lo, hi)``).

    Raises:
        DataError: fewer than 3 complete pairs, or every resample degenerate.
    """
    _check_method(method)
    if not 0.0 < level < 1.0:
        raise DataError(f"level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise DataError(f"n_boot must be positive, got {n_boot}")
    pairs = complete_pairs(df, x, y)
    _check_n(len(pairs))
    sources, targets, X, Y = _grid(pairs, x, y)
    present = np.isfinite(X)
    same = np.array([[s == t for t in targets] for s in sources], dtype=bool)
    present &= ~same
    idx = np.flatnonzero(present.ravel())
    reps = _replicates(X.ravel()[idx], Y.ravel()[idx], idx, len(sources), len(targets), method, n_boot,
                       np.random.default_rng(seed))
    ok = np.isfinite(reps)
    n_skipped = int((~ok).sum())
    if n_skipped:
        log.info("pair bootstrap %s~%s: skipped %d of %d degenerate resamples", x, y, n_skipped, n_boot)
    if ok.sum() < 2:
        raise DataError(f"pair bootstrap of {x}~{y}: every resample was degenerate ({n_skipped} of {n_boot})")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps[ok], [a, 1.0 - a])
    return BootstrapCI(lo=float(lo), hi=float(hi), level=level, method=method, n_boot=n_boot,
                       n_skipped=n_skipped, stderr=float(np.std(reps[ok], ddof=1)))
