"""One report per (x, y) correlation of a pair table, Appendix C, and the normalised columns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from diag.stats.bootstrap import BootstrapCI, pair_bootstrap_ci
from diag.stats.correlation import APPENDIX_C, complete_pairs, pearson, spearman
from diag.stats.permutation import PermutationResult, permutation_pvalue


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


def appendix_c_over_seeds(tables: dict[int, pd.DataFrame], n_boot: int = 2000, n_perm: int = 2000, seed: int = 0
                          ) -> tuple[dict[int, list[CorrelationReport]], list[dict]]:
    """:func:`correlate_appendix_c` per training seed's table, then per correlation the mean and sd (ddof 1) of r
    over the seeds and on how many seeds the CI excludes 0. Returns ``(per_seed, summary)``."""
    per_seed = {s: correlate_appendix_c(df, n_boot=n_boot, n_perm=n_perm, seed=seed) for s, df in tables.items()}
    summary = []
    for k, (x, y, paper) in enumerate(APPENDIX_C):
        rs = np.array([reports[k].pearson_r for reports in per_seed.values()])
        excl = sum(1 for reports in per_seed.values() if reports[k].ci95[0] > 0 or reports[k].ci95[1] < 0)
        summary.append({"x": x, "y": y, "mean_r": float(rs.mean()),
                        "sd_r": float(rs.std(ddof=1)) if len(rs) > 1 else float("nan"), "n_seeds": len(rs),
                        "seeds_ci_excludes_0": excl, "paper_r": paper})
    return per_seed, summary


def with_normalised(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of a pair table with the derived columns normalised by θ_ftᵀ.

    ermse_norm = ermse / ermse_ft_target, acc_norm = accuracy / accuracy_ft_target,
    acc_drop = 1 − acc_norm (positive = accuracy lost, the sign of every measured drop:
    :func:`diag.transfer.budget.accuracy_grid`); NaN where an input is missing.
    Existing derived columns are kept as they are.
    """
    out = df.copy()
    if "ermse_norm" not in out and {"ermse", "ermse_ft_target"} <= set(out.columns):
        out["ermse_norm"] = out["ermse"] / out["ermse_ft_target"]
    if "acc_norm" not in out and {"accuracy", "accuracy_ft_target"} <= set(out.columns):
        out["acc_norm"] = out["accuracy"] / out["accuracy_ft_target"]
    if "acc_drop" not in out and "acc_norm" in out:
        out["acc_drop"] = 1.0 - out["acc_norm"]
    return out
