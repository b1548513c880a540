"""The universal mix at a single source's step (``mix-matched``), and every mix counted once per target."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch

from diag.study.methods_report import method_counts, method_report, per_target, ranker_picks, universal_vs_ranker
from diag.transfer.methods import candidates, curvature_for, matched_scale
from diag.transfer.mixing import universal
from train.errors import DataError
from train.vectors import TaskVector

SOURCES = ["a", "b", "c", "d", "e", "f"]


def _vectors(dim: int = 4000) -> dict[str, TaskVector]:
    """Six random τ* of norms 1 … 6 in float64: near-orthogonal at this dimension (|cos| ~ 1/√dim)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, s in enumerate(SOURCES):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        out[s] = TaskVector({"w": (k + 1) * v / v.norm()}, "b0")
    return out


def test_matched_mix_takes_exactly_the_single_source_step():
    vectors = _vectors()
    mix = universal(vectors, target="t")
    tau = vectors["c"]  # ‖τ*ˢ‖ = 3
    curv = curvature_for("t", None, tau)
    (cand,) = candidates("mix-matched", tau, curv, 0.7, mixes={"universal": mix})
    assert (cand.scale * mix).norm() == pytest.approx((0.7 * tau).norm(), rel=1e-6, abs=0)
    assert cand.size == pytest.approx(0.7 * 3.0, rel=1e-6) and cand.param == "universal"
    # the unmatched mix is the short one: ‖mix‖² = Σ (k/6)² for near-orthogonal vectors, ‖mix‖ ≈ 1.59 < 3
    assert mix.norm() == pytest.approx(math.sqrt(sum(k * k for k in range(1, 7))) / 6, rel=0.02)
    # `mix` on its λ2 grid (0.4 … 1.2): even at 1.2 its step 1.2·1.59 ≈ 1.91 stays below 0.7·3 = 2.1
    largest = max(c.size for c in candidates("mix", tau, curv, mixes={"universal": mix}))
    assert largest == pytest.approx(1.2 * mix.norm(), rel=1e-6) and largest < 0.7 * tau.norm()
    # a grid of λ2 gives one candidate per λ2, each at ‖λ2·τ*ˢ‖
    sizes = [c.size for c in candidates("mix-matched", tau, curv, 0.7, grid=(0.4, 1.2), mixes={"universal": mix})]
    assert sizes == pytest.approx([0.4 * 3.0, 1.2 * 3.0], rel=1e-9)
    assert matched_scale(mix, vectors["f"], 0.7) == pytest.approx(0.7 * 6.0 / mix.norm(), rel=1e-12)
    with pytest.raises(DataError, match="norm 0"):
        matched_scale(0.0 * mix, tau, 0.7)


def _seven_targets() -> pd.DataFrame:
    """7 domains, 42 pairs: plain E-RMSE 0.8 everywhere; the mix (one vector per target, so the same on each of
    the target's 6 rows) at 0.7 on targets 0–3 and at 0.9 on 4–6."""
    domains = [f"d{k}" for k in range(7)]
    rows = []
    for i, t in enumerate(domains):
        for j, s in enumerate(domains):
            if s == t:
                continue
            base = {"source": s, "target": t, "lambda2": 0.7, "seed": 0, "variant": "paper", "alpha": 0.8,
                    "accuracy_ft_target": 1.0, "ermse_ft_target": 1.0, "ermse_plain": 0.8, "ermse_meanmap": 0.95,
                    "corr_img_se": 0.05, "cos_ft": 0.1 * ((3 * i + 5 * j) % 7), "norm_star_source": 1.0 + j,
                    "corr_img": 0.3}
            rows.append({**base, "method": "plain", "pair_key": f"p{s}{t}", "accuracy": 0.96, "ermse": 0.8})
            rows.append({**base, "method": "mix", "pair_key": f"m{s}{t}", "accuracy": 0.97,
                         "ermse": 0.7 if i < 4 else 0.9})
    return pd.DataFrame(rows)


def test_a_mix_repeated_over_six_pairs_counts_once_per_target():
    df = _seven_targets()
    assert (df["method"] == "mix").sum() == 42  # the mix of each target sits on its 6 pairs
    rep = method_report(df, 0.7)
    assert rep.per_seed["plain"][0]["n_pairs"] == 42
    # (a): the mix keeps 0.3 ≥ 0.8·0.2 of plain's reduction on targets 0–3 only; (b) 0.7, 0.9 < 0.95 everywhere
    assert rep.per_seed["mix"][0] == {"n_targets": 7, "keeps": 4, "n_plain_reduces": 7, "beats_prior": 7}
    u = rep.universal[0]
    assert (u["n_targets"], u["universal_wins"]) == (7, 4)
    assert u["universal_wins_ci"] == pytest.approx([0.2504, 0.8417], abs=1e-4)  # Wilson 95 % of 4 / 7
    assert u["universal_dermse"][0] == pytest.approx((4 * -0.1 + 3 * 0.1) / 7)
    text = rep.table()
    assert "7 targets" in text and "42 pairs" in text and "on 4.0 ± — (one seed) of 7 targets" in text
    with pytest.raises(DataError, match="once per target"):
        method_counts(df[df["method"] == "mix"])  # no ranker picks: refused, never counted per pair
    picks = ranker_picks(df[df["method"] == "plain"])
    assert len(per_target(df[df["method"] == "mix"], picks)) == 7


def test_matched_mix_is_read_at_the_ranker_source_not_averaged():
    """``mix-matched`` rows differ by source (their step); (c) reads the ranker's source's row.

    Three domains: the cos_ft proxy picks C for A, A for B, B for C (as in test_method_report).
    """
    from test_method_report import COS_FT, PAIRS, _table

    picked = {("C", "A"), ("A", "B"), ("B", "C")}
    rows = []
    for k, (s, t) in enumerate(PAIRS):
        rows.append({"source": s, "target": t, "lambda2": 0.7, "seed": 0, "variant": "paper", "alpha": 0.8,
                     "method": "mix-matched", "pair_key": f"mm{k}", "accuracy_ft_target": 1.0,
                     "ermse_ft_target": 1.0, "ermse_plain": 0.8, "ermse_meanmap": 0.9, "corr_img_se": 0.05,
                     "cos_ft": COS_FT[(s, t)], "accuracy": 0.9 if (s, t) in picked else 0.5,
                     "ermse": 0.7 if (s, t) in picked else 0.95, "corr_img": 0.3, "repair_size": 0.7 * 2.0})
    table = _table()
    df = pd.concat([table[table["seed"] == 0].assign(norm_star_source=2.0), pd.DataFrame(rows)], ignore_index=True)
    u = universal_vs_ranker(df[df["lambda2"] == 0.7])
    assert {t: v["ermse_matched"] for t, v in u["per_target"].items()} == {"A": 0.7, "B": 0.7, "C": 0.7}
    assert (u["matched_wins"], u["matched_beats_universal"]) == (3, 3)  # averaged over sources it would be 0 and 0
    assert u["matched_dermse"] == pytest.approx([-0.1, 0.0], abs=1e-12)
    assert u["matched_daccuracy"] == pytest.approx([0.9 - 0.96, 0.0], abs=1e-12)
    assert all(v["size_matched"] == pytest.approx(v["size_source"]) for v in u["per_target"].values())
    rep = method_report(df, 0.7)
    assert rep.per_seed["mix-matched"][0] == {"n_targets": 3, "keeps": 0, "n_plain_reduces": 3, "beats_prior": 3}
    # the ranked mix at the same step, better on A only: the two mixes at one step compared target by target
    ranked = pd.DataFrame(rows).assign(method="mix-ranked-matched", pair_key=lambda d: "r" + d["pair_key"])
    ranked["ermse"] = [0.6 if (s, t) == ("C", "A") else e for s, t, e in zip(ranked["source"], ranked["target"],
                                                                             ranked["ermse"])]
    u2 = universal_vs_ranker(pd.concat([df, ranked], ignore_index=True))
    assert (u2["ranked_matched_wins"], u2["ranked_matched_beats_matched"]) == (3, 1)
    text = method_report(pd.concat([df, ranked], ignore_index=True), 0.7).table()
    assert "at the source's step, the ranker-weighted mix beats the universal vector" in text


def test_study_mix_matched_with_one_other_domain_is_plain_eq8(tmp_path):
    """Two domains: the universal mix is the other domain's τ* itself, so at plain eq. 8's step it *is* plain eq. 8
    (scale λ2, same E-RMSE and accuracy); its rows are new keys beside the resumed plain and mix rows."""
    from _smoke import METHOD_DOMAINS, one_thread, smoke_method_study
    from diag.study.run import run_study, StudySettings

    store, shared, df = smoke_method_study()
    out = tmp_path / "methods"  # a copy: the shared study keeps its two methods for the other tests
    shutil.copytree(shared, out)
    with one_thread():
        again = run_study(store, METHOD_DOMAINS, StudySettings(lambda2s=(0.7,), curvature=False,
                                                               methods=("plain", "mix", "mix-matched")),
                          out_dir=out, progress=False)
    assert again.groupby("method").size().to_dict() == {"mix": 2, "mix-matched": 2, "plain": 2}
    pd.testing.assert_frame_equal(again[again["method"] != "mix-matched"].reset_index(drop=True),
                                  df.reset_index(drop=True), check_like=True)
    matched = again[again["method"] == "mix-matched"].set_index(["source", "target"]).sort_index()
    for (s, t), r in matched.iterrows():
        assert r["repair_scale"] == pytest.approx(0.7, rel=1e-6)
        assert r["repair_size"] == pytest.approx(0.7 * r["norm_star_source"], rel=1e-6)
        assert r["ermse"] == pytest.approx(r["ermse_plain"], abs=1e-6)
        assert r["accuracy"] == pytest.approx(r["accuracy_plain"], abs=1e-9)
