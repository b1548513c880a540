"""QAP permutation test of a pair-table correlation (domain labels relabelled, dependence kept)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from diag.stats.correlation import _check_method, _check_n, _pearson_r, complete_pairs, rankdata
from train.errors import DataError


@dataclass(frozen=True)
class PermutationResult:
    """Two-sided permutation p-value of a correlation (QAP relabelling of domains).

    Attributes:
        statistic: observed correlation.
        pvalue: (1 + #{|r_π| ≥ |r_obs|}) / (1 + n_perm) for random permutations, or the exact
            fraction over all permutations (identity included) when ``exact``.
        stderr: Monte Carlo standard error sqrt(p (1 - p) / n_perm) (0 when exact).
        n_perm: permutations used; scheme: ``"joint"`` (one permutation of the shared domain
            set applied to source and target labels) or ``"separate"``.
    """

    statistic: float
    pvalue: float
    stderr: float
    n_perm: int
    method: str
    scheme: str
    exact: bool

    def __float__(self) -> float:
        return float(self.pvalue)

    def __repr__(self) -> str:
        kind = "exact" if self.exact else f"MC se={self.stderr:.3g}"
        return (f"PermutationResult({self.method} r={self.statistic:.4f}, p={self.pvalue:.4g} "
                f"[{self.scheme}, {self.n_perm} perms, {kind}])")

    def to_dict(self) -> dict:
        return {"statistic": self.statistic, "pvalue": self.pvalue, "stderr": self.stderr, "n_perm": self.n_perm,
                "method": self.method, "scheme": self.scheme, "exact": self.exact}


def _corr_masked(xv: np.ndarray, yv: np.ndarray, method: str) -> float:
    if xv.size < 3 or np.ptp(xv) == 0 or np.ptp(yv) == 0:
        return np.nan
    if method == "spearman":
        xv, yv = rankdata(xv), rankdata(yv)
    return _pearson_r(xv, yv)


def permutation_pvalue(df: pd.DataFrame, x: str, y: str, n_perm: int = 2000, seed: int = 0,
                       method: str = "pearson") -> PermutationResult:
    """Two-sided permutation test of H0: the x-matrix and the y-matrix are independent.

    Scheme (QAP, the quadratic assignment procedure used for dyadic data such as a
    Mantel test): the y values keep their (source, target) matrix but the *domain labels*
    are permuted, y'(s, t) = y(π(s), π(t)), and the correlation is recomputed against the
    unchanged x(s, t).  When sources and targets are the same set of domains (the all-pairs
    study) one permutation π of that set relabels both indices ("joint"), which maps
    off-diagonal pairs to off-diagonal pairs and keeps every source effect, target effect
    and the reciprocity between (s, t) and (t, s) of y intact.  Under H0 (and joint
    exchangeability of the domains) every relabelling is equally likely, so the test is
    exact, unlike permuting y across pairs freely, which would destroy the shared-domain
    structure and give optimistic p-values just like the naive t-test.  When sources and
    targets differ as sets, sources and targets are relabelled separately ("separate").
    Relabelled pairs with no y value are dropped for that permutation.

    With at most ``n_perm`` distinct permutations all are enumerated (exact p-value);
    note that with d domains the smallest attainable p is then 1/d! — e.g. 1/6 for 3.

    Args:
        df: pair table with ``source``, ``target``, ``x``, ``y``.
        x, y: column names.
        n_perm: number of random permutations.
        seed: seed of ``numpy.random.default_rng``.
        method: ``"pearson"`` or ``"spearman"``.

    Returns:
        PermutationResult (``float(result)`` is the p-value).
    """
    _check_method(method)
    if n_perm < 1:
        raise DataError(f"n_perm must be positive, got {n_perm}")
    pairs = complete_pairs(df, x, y)
    _check_n(len(pairs))
    r_obs = _corr_masked(pairs[x].to_numpy(float), pairs[y].to_numpy(float), method)
    if not np.isfinite(r_obs):
        raise DataError(f"correlation of {x}~{y} is undefined: constant column")
    grid = _YMatrix.of(pairs, x, y)
    n_s, n_t = grid.Y.shape
    scheme = "joint" if grid.joint else "separate"
    n_total = math.factorial(n_s) * (1 if grid.joint else math.factorial(n_t))
    tol = 1e-12 * max(1.0, abs(r_obs))
    if n_total <= n_perm:
        rs = np.asarray([grid.stat(ps, pt, method) for ps, pt in _all_relabellings(n_s, n_t, grid.joint)])
        rs = rs[np.isfinite(rs)]
        p = float(np.mean(np.abs(rs) >= abs(r_obs) - tol))
        return PermutationResult(statistic=r_obs, pvalue=p, stderr=0.0, n_perm=int(rs.size), method=method,
                                 scheme=scheme, exact=True)
    rng = np.random.default_rng(seed)
    rs = np.empty(n_perm)
    for b in range(n_perm):
        ps = rng.permutation(n_s)
        rs[b] = grid.stat(ps, ps if grid.joint else rng.permutation(n_t), method)
    rs = rs[np.isfinite(rs)]
    hits = int(np.sum(np.abs(rs) >= abs(r_obs) - tol))
    p = (1.0 + hits) / (1.0 + rs.size)
    return PermutationResult(statistic=r_obs, pvalue=p, stderr=math.sqrt(p * (1 - p) / max(rs.size, 1)),
                             n_perm=int(rs.size), method=method, scheme=scheme, exact=False)


@dataclass(frozen=True)
class _YMatrix:
    """y as a (source × target) matrix, the pairs' indices into it and their x values.

    ``joint``: sources and targets are the same set of domains (one relabelling for both).
    """

    Y: np.ndarray
    s_idx: np.ndarray
    t_idx: np.ndarray
    xv: np.ndarray
    joint: bool

    @classmethod
    def of(cls, pairs: pd.DataFrame, x: str, y: str) -> _YMatrix:
        joint = set(pairs["source"]) == set(pairs["target"])
        s_dom = sorted(set(pairs["source"]))
        t_dom = s_dom if joint else sorted(set(pairs["target"]))
        si = {d: i for i, d in enumerate(s_dom)}
        ti = {d: i for i, d in enumerate(t_dom)}
        Y = np.full((len(s_dom), len(t_dom)), np.nan)
        s_idx = pairs["source"].map(si).to_numpy()
        t_idx = pairs["target"].map(ti).to_numpy()
        Y[s_idx, t_idx] = pairs[y].to_numpy(float)
        return cls(Y, s_idx, t_idx, pairs[x].to_numpy(float), joint)

    def stat(self, ps: np.ndarray, pt: np.ndarray, method: str) -> float:
        """Correlation of x with the relabelled y'(s, t) = y(ps[s], pt[t]) (pairs without y dropped)."""
        yv = self.Y[ps[self.s_idx], pt[self.t_idx]]
        keep = np.isfinite(yv)
        return _corr_masked(self.xv[keep], yv[keep], method)


def _all_relabellings(n_s: int, n_t: int, joint: bool):
    """Every (source, target) relabelling: one permutation for both when ``joint``, else all pairs."""
    for ps in itertools.permutations(range(n_s)):
        ps = np.asarray(ps)
        if joint:
            yield ps, ps
        else:
            for pt in itertools.permutations(range(n_t)):
                yield ps, np.asarray(pt)
