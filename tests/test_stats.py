"""Correlation statistics against scipy, closed forms and synthetic pair designs."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from diag.stats import (APPENDIX_C, CorrelationReport, correlate, correlate_appendix_c, pair_bootstrap_ci, pearson,
                        permutation_pvalue, spearman, with_normalised)
from train.errors import DataError

HAND = [
    ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]),
    ([1.0, 2.0, 3.0], [0.0, 0.0, 1.0]),
    ([0.3, -1.2, 2.5, 0.0, 4.1, 1.1, -0.7], [1.0, 0.1, 2.0, 0.2, 1.9, 1.9, -3.0]),
    ([1, 2, 2, 3, 5, 5, 5, 8], [2, 1, 4, 4, 3, 7, 6, 6]),  # ties for Spearman
]


def pair_table(n_dom=8, rho=0.5, seed=0, comp=(1.0, 1.0, 1.0)):
    """All ordered pairs; x, y = source effect + target effect + pair noise, each component
    bivariate normal with correlation rho, so corr(x, y) = rho in the population."""
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, rho], [rho, 1.0]])
    u = rng.multivariate_normal([0, 0], cov * comp[0], n_dom)
    v = rng.multivariate_normal([0, 0], cov * comp[1], n_dom)
    rows = []
    for s in range(n_dom):
        for t in range(n_dom):
            if s == t:
                continue
            e = rng.multivariate_normal([0, 0], cov * comp[2])
            x, y = u[s] + v[t] + e
            rows.append({"source": f"d{s}", "target": f"d{t}", "x": x, "y": y})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("x,y", HAND)
def test_pearson_spearman_match_scipy(x, y):
    p = pearson(x, y)
    ref = scipy.stats.pearsonr(x, y)
    assert p.n == len(x)
    np.testing.assert_allclose(p.statistic, ref.statistic, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p.pvalue, ref.pvalue, rtol=1e-10, atol=1e-14)
    s = spearman(x, y)
    ref = scipy.stats.spearmanr(x, y)
    np.testing.assert_allclose(s.statistic, ref.statistic, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.pvalue, ref.pvalue, rtol=1e-10, atol=1e-14)


def test_hand_derived_values():
    # r = 0.5; p = I_{3/4}(1/2, 1/2) = (2/pi) asin(sqrt(3)/2) = 2/3
    r = pearson([1, 2, 3], [1, 3, 2])
    assert r.statistic == pytest.approx(0.5, abs=1e-15)
    assert r.pvalue == pytest.approx(2 / 3, abs=1e-13)
    # r = sqrt(3)/2; p = (2/pi) asin(1/2) = 1/3
    r = pearson([1, 2, 3], [0, 0, 1])
    assert r.statistic == pytest.approx(math.sqrt(3) / 2, abs=1e-15)
    assert r.pvalue == pytest.approx(1 / 3, abs=1e-13)
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]).pvalue == 0.0
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]).statistic == pytest.approx(1.0)


def test_bad_input_raises():
    with pytest.raises(DataError):
        pearson([1, 2], [2, 1])
    with pytest.raises(DataError):
        pearson([1, 2, 3], [1, 1, 1])
    with pytest.raises(DataError):
        pearson([1, 2, np.nan], [1, 2, 3])
    with pytest.raises(DataError):
        correlate(pd.DataFrame({"source": ["a"], "target": ["b"], "x": [1.0]}), "x", "y")


def test_bootstrap_ci_covers_truth():
    rho = 0.5
    cover, widths = 0, []
    for seed in range(20):
        df = pair_table(n_dom=10, rho=rho, seed=seed)
        ci = pair_bootstrap_ci(df, "x", "y", n_boot=400, seed=seed)
        lo, hi = ci
        assert lo < pearson(df.x, df.y).statistic < hi
        assert ci.n_skipped == 0 and ci.stderr > 0
        cover += lo <= rho <= hi
        widths.append(hi - lo)
    assert cover >= 16, cover
    # the two-way bootstrap is wider than the naive Fisher-z interval over 90 "independent" pairs
    naive = np.tanh(np.arctanh(rho) + 1.96 / math.sqrt(90 - 3)) - np.tanh(np.arctanh(rho) - 1.96 / math.sqrt(90 - 3))
    assert np.median(widths) > naive


def test_bootstrap_spearman_and_skips():
    df = pair_table(n_dom=6, rho=0.8, seed=1)
    lo, hi = pair_bootstrap_ci(df, "x", "y", method="spearman", n_boot=300, seed=2)
    assert -1 <= lo < spearman(df.x, df.y).statistic < hi <= 1
    # 3 domains: a resample drawing one source and one target only has < 3 pairs -> skipped
    small = pair_table(n_dom=3, rho=0.8, seed=3)
    ci = pair_bootstrap_ci(small, "x", "y", n_boot=300, seed=0)
    assert 0 < ci.n_skipped < 300
    # deterministic under the seed
    assert tuple(pair_bootstrap_ci(df, "x", "y", n_boot=200, seed=5)) == tuple(
        pair_bootstrap_ci(df, "x", "y", n_boot=200, seed=5))


def test_permutation_strong_and_null():
    strong = pair_table(n_dom=8, rho=0.95, seed=0)
    res = permutation_pvalue(strong, "x", "y", n_perm=500, seed=0)
    assert res.scheme == "joint" and not res.exact
    assert res.pvalue < 0.01 and float(res) == res.pvalue
    naive_hits, perm_hits, ps = 0, 0, []
    for seed in range(40):
        # independent x and y, both dominated by shared source/target effects
        df = pair_table(n_dom=8, rho=0.0, seed=100 + seed, comp=(1.0, 1.0, 0.2))
        naive_hits += pearson(df.x, df.y).pvalue < 0.05
        p = permutation_pvalue(df, "x", "y", n_perm=200, seed=seed).pvalue
        perm_hits += p < 0.05
        ps.append(p)
    assert perm_hits <= 6, perm_hits           # nominal 2 of 40
    assert naive_hits > perm_hits + 4           # the naive t-test is optimistic here
    assert 0.3 < np.mean(ps) < 0.7              # roughly uniform under H0


def test_permutation_exact_enumeration():
    df = pair_table(n_dom=3, rho=0.9, seed=0)
    df["y"] = 2 * df["x"] + 1                    # perfect correlation: only identity reaches |r| = 1
    res = permutation_pvalue(df, "x", "y", n_perm=2000)
    assert res.exact and res.n_perm == 6 and res.stderr == 0
    assert res.pvalue == pytest.approx(1 / 6)


def test_permutation_separate_sources_and_targets():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=4), rng.normal(size=4)
    rows = [{"source": f"s{i}", "target": f"t{j}", "x": u[i] + v[j] + 0.1 * rng.normal()}
            for i in range(4) for j in range(4)]
    df = pd.DataFrame(rows)
    df["y"] = df["x"] + 0.05 * rng.normal(size=len(df))
    res = permutation_pvalue(df, "x", "y", n_perm=1000)
    assert res.scheme == "separate" and res.exact and res.n_perm == 24 * 24
    assert res.pvalue == pytest.approx(1 / 576)          # only the identity relabelling matches
    lo, hi = pair_bootstrap_ci(df, "x", "y", n_boot=200)
    assert lo < pearson(df.x, df.y).statistic < hi and lo > 0.9


def test_correlate_report_and_appendix_c():
    df = pair_table(n_dom=8, rho=0.6, seed=4).rename(columns={"x": "cos_star", "y": "ermse"})
    df["cos_ft"] = df["cos_star"] + 0.1
    df.loc[3, "ermse"] = np.nan                  # missing values are dropped
    rep = correlate(df, "cos_star", "ermse", paper_r=-0.51, n_boot=200, n_perm=200)
    assert isinstance(rep, CorrelationReport) and rep.n_pairs == 55
    d = rep.to_dict()
    assert {"x", "y", "pearson_r", "pearson_p", "spearman_rho", "ci95", "perm_p", "paper_r"} <= set(d)
    assert d["paper_r"] == -0.51 and len(d["ci95"]) == 2
    ok = df.dropna()
    assert d["pearson_r"] == pytest.approx(scipy.stats.pearsonr(ok.cos_star, ok.ermse).statistic, rel=1e-12)
    assert d["ci95"][0] < d["pearson_r"] < d["ci95"][1]
    reports = correlate_appendix_c(df, n_boot=100, n_perm=100)
    assert [(r.x, r.y, r.paper_r) for r in reports] == APPENDIX_C
    assert "paper r=-0.51" in repr(reports[0])


def test_with_normalised():
    df = pd.DataFrame({"ermse": [1.0, 2.0], "ermse_ft_target": [2.0, 2.0], "accuracy": [0.45, np.nan],
                       "accuracy_ft_target": [0.9, 0.9]})
    out = with_normalised(df)
    np.testing.assert_allclose(out["ermse_norm"], [0.5, 1.0])
    np.testing.assert_allclose(out["acc_drop"], [0.5, np.nan])
    assert "ermse_norm" not in df


# ---- figures (diag/study/figures.py): each writes a real PNG from a small synthetic frame ----

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    return path.exists() and path.stat().st_size > 5000 and path.read_bytes()[:8] == PNG


def _study_table():
    df = pair_table(n_dom=4, rho=-0.5, seed=7).rename(columns={"x": "cos_star", "y": "ermse"})
    rng = np.random.default_rng(0)
    df["cos_ft"] = 0.7 * df["cos_star"] + rng.normal(0, 0.3, len(df))
    df["ermse"] = 1.3 + 0.1 * df["ermse"]
    df["ermse_ft_target"] = 1.5
    df["accuracy"] = rng.uniform(0.8, 0.9, len(df))
    df["accuracy_ft_target"] = 0.9
    return df


def test_figures_write_png(tmp_path):
    from diag.study import figures

    df = _study_table()
    assert _is_png(figures.figure6(df, tmp_path / "f6.png"))
    reps = correlate_appendix_c(df, n_boot=50, n_perm=50)
    assert _is_png(figures.figure6(df, tmp_path / "f6r.png", reports=reps))
    controls = df.head(3).assign(row="random_vector", ermse=1.6)
    both = pd.concat([df.assign(row="proposed"), controls], ignore_index=True)
    both["acc_norm_zeroshot"] = 0.5
    assert _is_png(figures.figure2(both, tmp_path / "f2.png"))
    lam = pd.DataFrame([{"target": t, "lambda2": l, "alpha": a, "ermse": 1.5 - 0.2 * l + 0.01 * a,
                         "ermse_ft_target": 1.5, "accuracy": 0.9 - 0.05 * l * a, "accuracy_ft_target": 0.9,
                         "iou10": 0.2 + 0.1 * l, "iou10_ft_target": 0.2}
                        for t in ("d0", "d1") for l in (0.4, 0.7, 1.0) for a in (0.2, 0.8)])
    assert _is_png(figures.figure3(lam, tmp_path / "sub" / "f3.png"))
    ks = pd.DataFrame([{"method": "kernelshap", "n_perturbations": p, "target": t, "ermse": 1.4 - p / 5000,
                        "iou1": 0.05 + p / 5000, "wall_s": p / 100} for t in ("d0", "d1") for p in (50, 300, 1000)]
                      + [{"method": "proposed", "target": t, "ermse": 1.1, "iou1": 0.11, "wall_s": 0.01}
                         for t in ("d0", "d1")])
    assert _is_png(figures.figure5(ks, tmp_path / "f5.png"))
    with pytest.raises(DataError, match="figure6 needs"):
        figures.figure6(df.drop(columns="cos_ft"), tmp_path / "bad.png")
    with pytest.raises(DataError, match="kernelshap"):
        figures.figure5(ks[ks.method == "proposed"], tmp_path / "bad.png")
