"""Correlation statistics for pair tables: Pearson, Spearman, pair bootstrap, permutation.

A study table has one row per ordered (source, target) pair.  Pairs that share a source or
a target are not independent, so the naive p-value of Pearson's r (the one the preprint
reports in Appendix C) is optimistic.  This module gives, beside it:

* :func:`pair_bootstrap_ci` — a two-way cluster bootstrap that resamples *domains as
  sources* and *domains as targets*;
* :func:`permutation_pvalue` — a QAP (quadratic assignment procedure) permutation test that
  relabels the domains of the y-matrix and so keeps its row/column dependence.

:func:`correlate` bundles everything into one :class:`CorrelationReport`.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import special
from scipy.stats import rankdata

from train.errors import DataError, unknown

log = logging.getLogger(__name__)

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
    rng = np.random.default_rng(seed)
    ns, nt = len(sources), len(targets)
    idx = np.flatnonzero(present.ravel())
    xv = X.ravel()[idx]
    yv = Y.ravel()[idx]
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
    joint = set(pairs["source"]) == set(pairs["target"])
    if joint:
        domains = sorted(set(pairs["source"]))
        s_dom = t_dom = domains
    else:
        s_dom = sorted(set(pairs["source"]))
        t_dom = sorted(set(pairs["target"]))
    si = {d: i for i, d in enumerate(s_dom)}
    ti = {d: i for i, d in enumerate(t_dom)}
    Y = np.full((len(s_dom), len(t_dom)), np.nan)
    s_idx = pairs["source"].map(si).to_numpy()
    t_idx = pairs["target"].map(ti).to_numpy()
    Y[s_idx, t_idx] = pairs[y].to_numpy(float)
    xv_all = pairs[x].to_numpy(float)

    def stat(ps: np.ndarray, pt: np.ndarray) -> float:
        yv = Y[ps[s_idx], pt[t_idx]]
        keep = np.isfinite(yv)
        return _corr_masked(xv_all[keep], yv[keep], method)

    n_total = math.factorial(len(s_dom)) * (1 if joint else math.factorial(len(t_dom)))
    tol = 1e-12 * max(1.0, abs(r_obs))
    if n_total <= n_perm:
        rs = []
        for ps in itertools.permutations(range(len(s_dom))):
            ps = np.asarray(ps)
            if joint:
                rs.append(stat(ps, ps))
            else:
                for pt in itertools.permutations(range(len(t_dom))):
                    rs.append(stat(ps, np.asarray(pt)))
        rs = np.asarray(rs)
        rs = rs[np.isfinite(rs)]
        p = float(np.mean(np.abs(rs) >= abs(r_obs) - tol))
        return PermutationResult(statistic=r_obs, pvalue=p, stderr=0.0, n_perm=int(rs.size), method=method,
                                 scheme="joint" if joint else "separate", exact=True)
    rng = np.random.default_rng(seed)
    rs = np.empty(n_perm)
    for b in range(n_perm):
        ps = rng.permutation(len(s_dom))
        pt = ps if joint else rng.permutation(len(t_dom))
        rs[b] = stat(ps, pt)
    rs = rs[np.isfinite(rs)]
    hits = int(np.sum(np.abs(rs) >= abs(r_obs) - tol))
    p = (1.0 + hits) / (1.0 + rs.size)
    return PermutationResult(statistic=r_obs, pvalue=p, stderr=math.sqrt(p * (1 - p) / max(rs.size, 1)),
                             n_perm=int(rs.size), method=method, scheme="joint" if joint else "separate",
                             exact=False)


@dataclass(frozen=True)
class CorrelationReport:
    """Everything reported for one (x, y) correlation of a pair table.

    ``pearson_p`` and ``spearman_p`` are the naive t-test p-values (as the preprint reports
    them; they assume independent pairs).  ``ci95`` is the two-way cluster bootstrap CI of
    Pearson's r (resampling sources and targets) and ``perm_p`` the QAP permutation p-value;
    these two respect that pairs share domains.
    """

    x: str
    y: str
    n_pairs: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    ci95: tuple[float, float]
    perm_p: float
    paper_r: float | None = None
    bootstrap: BootstrapCI | None = field(default=None, repr=False)
    permutation: PermutationResult | None = field(default=None, repr=False)
    slope: float = float("nan")
    intercept: float = float("nan")

    def __repr__(self) -> str:
        paper = "" if self.paper_r is None else f", paper r={self.paper_r:+.2f}"
        return (f"CorrelationReport({self.x} ~ {self.y}, n={self.n_pairs}: r={self.pearson_r:+.3f} "
                f"(p={self.pearson_p:.2g}, CI [{self.ci95[0]:+.3f}, {self.ci95[1]:+.3f}], perm p={self.perm_p:.3g}), "
                f"rho={self.spearman_rho:+.3f}{paper})")

    def to_dict(self) -> dict:
        """JSON-ready dict: x, y, pearson_r, pearson_p, spearman_rho, ci95, perm_p, paper_r and extras."""
        d = {"x": self.x, "y": self.y, "pearson_r": self.pearson_r, "pearson_p": self.pearson_p,
             "spearman_rho": self.spearman_rho, "ci95": [self.ci95[0], self.ci95[1]], "perm_p": self.perm_p,
             "paper_r": self.paper_r, "n_pairs": self.n_pairs, "spearman_p": self.spearman_p,
             "slope": self.slope, "intercept": self.intercept}
        if self.bootstrap is not None:
            d["ci95_stderr"] = self.bootstrap.stderr
            d["ci95_skipped"] = self.bootstrap.n_skipped
        if self.permutation is not None:
            d["perm_p_stderr"] = self.permutation.stderr
            d["perm_scheme"] = self.permutation.scheme
        return d


def correlate(df: pd.DataFrame, x: str, y: str, paper_r: float | None = None, n_boot: int = 2000,
              n_perm: int = 2000, seed: int = 0, level: float = 0.95) -> CorrelationReport:
    """Pearson (naive p), Spearman, pair-bootstrap CI and QAP permutation p of ``x`` vs ``y``.

    Rows with NaN in x or y are dropped first; ``n_pairs`` counts the remaining ones.  Also
    fits the least-squares line y = slope·x + intercept (for Figure 6).

    Raises:
        DataError: missing columns, fewer than 3 complete pairs, or a constant column.
    """
    pairs = complete_pairs(df, x, y)
    xv, yv = pairs[x].to_numpy(float), pairs[y].to_numpy(float)
    p = pearson(xv, yv)
    s = spearman(xv, yv)
    ci = pair_bootstrap_ci(pairs, x, y, method="pearson", n_boot=n_boot, seed=seed, level=level)
    perm = permutation_pvalue(pairs, x, y, n_perm=n_perm, seed=seed, method="pearson")
    slope, intercept = np.polyfit(xv, yv, 1)
    return CorrelationReport(x=x, y=y, n_pairs=p.n, pearson_r=p.statistic, pearson_p=p.pvalue,
                             spearman_rho=s.statistic, spearman_p=s.pvalue, ci95=(ci.lo, ci.hi),
                             perm_p=perm.pvalue, paper_r=paper_r, bootstrap=ci, permutation=perm,
                             slope=float(slope), intercept=float(intercept))


def correlate_appendix_c(df: pd.DataFrame, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
                         level: float = 0.95) -> list[CorrelationReport]:
    """:func:`correlate` for each of :data:`APPENDIX_C`, with the paper's r attached."""
    return [correlate(df, x, y, paper_r=r, n_boot=n_boot, n_perm=n_perm, seed=seed, level=level)
            for x, y, r in APPENDIX_C]


def with_normalised(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of a pair table with the derived columns normalised by θ_ftᵀ.

    ermse_norm = ermse / ermse_ft_target, acc_norm = accuracy / accuracy_ft_target,
    acc_change = acc_norm - 1 (negative = accuracy lost); NaN where an input is missing.
    Existing derived columns are kept as they are.
    """
    out = df.copy()
    if "ermse_norm" not in out and {"ermse", "ermse_ft_target"} <= set(out.columns):
        out["ermse_norm"] = out["ermse"] / out["ermse_ft_target"]
    if "acc_norm" not in out and {"accuracy", "accuracy_ft_target"} <= set(out.columns):
        out["acc_norm"] = out["accuracy"] / out["accuracy_ft_target"]
    if "acc_change" not in out and "acc_norm" in out:
        out["acc_change"] = out["acc_norm"] - 1.0
    return out
