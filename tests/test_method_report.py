"""The method study report and the Pareto front on hand-made tables (exact counts)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from diag.study.methods_report import method_report, pareto_front, tradeoff_frame

PAIRS = [("B", "A"), ("C", "A"), ("A", "B"), ("C", "B"), ("A", "C"), ("B", "C")]
PLAIN_ERMSE = [1.1, 0.8, 0.8, 0.8, 0.8, 0.8]  # plain does not reduce E-RMSE on B→A only
COS_FT = {("B", "A"): 0.3, ("C", "A"): 0.5, ("A", "B"): 0.6, ("C", "B"): 0.2, ("A", "C"): 0.1, ("B", "C"): 0.4}
MIX_ERMSE = {"A": 0.75, "B": 0.85, "C": 0.79}


def _row(method, seed, k, **values):
    s, t = PAIRS[k]
    return {"source": s, "target": t, "lambda2": 0.7, "seed": seed, "variant": "paper", "alpha": 0.8,
            "method": method, "pair_key": f"{method}{seed}{k}", "accuracy_ft_target": 1.0, "ermse_ft_target": 1.0,
            "ermse_plain": PLAIN_ERMSE[k], "ermse_meanmap": 0.9, "corr_img_se": 0.05, "cos_ft": COS_FT[(s, t)],
            **values}


def _table() -> pd.DataFrame:
    rows = []
    pre_acc = {0: [0.96, 0.95, 0.96, 0.94, 1.0, 0.99], 1: [0.96, 0.95, 0.96, 0.94, 1.0, 0.9]}
    plain_loss = [0.49, 0.98, 0.2, 0.49, 2.0, 0.49]
    for seed in (0, 1):
        for k in range(6):
            rows.append(_row("plain", seed, k, accuracy=0.96, ermse=PLAIN_ERMSE[k], corr_img=0.3, risk_exact=2.0,
                             loss_increase_val=plain_loss[k]))
            rows.append(_row("precondition", seed, k, accuracy=pre_acc[seed][k],
                             ermse=[0.95, 0.84, 0.85, 0.7, 0.7, 0.7][k], corr_img=0.05 if k == 4 else 0.3,
                             repair_predicted_loss_increase=0.1, loss_increase_val=0.3))
            rows.append(_row("mix", seed, k, accuracy=0.97, ermse=MIX_ERMSE[PAIRS[k][1]], corr_img=0.3,
                             loss_increase_val=0.1))
    rows.append(_row("plain", 0, 0, accuracy=0.1, ermse=9.0, corr_img=0.0) | {"lambda2": 1.0})  # other λ2: ignored
    return pd.DataFrame(rows)


def test_method_report_exact_counts():
    rep = method_report(_table(), 0.7)
    assert rep.per_seed["plain"] == {s: {"n_pairs": 6, "keeps": 5, "n_plain_reduces": 5, "beats_prior": 5}
                                     for s in (0, 1)}
    assert rep.per_seed["precondition"][0] == {"n_pairs": 6, "keeps": 4, "n_plain_reduces": 5, "beats_prior": 4}
    assert rep.per_seed["precondition"][1]["keeps"] == 3
    assert rep.mean_sd["precondition"]["keeps"] == pytest.approx((3.5, math.sqrt(0.5)))
    # a mix counts once per target, against the ranker's source (C for A, A for B, B for C): A keeps 0.25 ≥ 0.8·0.2,
    # B's 0.15 does not, C's 0.21 does (per pair it was 4 of 6, B→A counted with a baseline no one picks)
    assert rep.per_seed["mix"][0] == {"n_targets": 3, "keeps": 2, "n_plain_reduces": 3, "beats_prior": 3}
    # (c): the cos_ft proxy picks C for A, A for B, B for C; the universal vector wins on A and C
    u = rep.universal[0]
    assert (u["n_targets"], u["universal_wins"]) == (3, 2)
    assert {t: v["source"] for t, v in u["per_target"].items()} == {"A": "C", "B": "A", "C": "B"}
    # (d): plain predicted ½·0.49·2 = 0.49 → ratios 1, 2, 0.41, 1, 4.1, 1 (twice)
    q = rep.quadratic["plain"]
    assert q["n"] == 12 and q["median_ratio"] == pytest.approx(1.0) and q["holds"] == pytest.approx(4 / 6)
    assert rep.quadratic["precondition"]["median_ratio"] == pytest.approx(3.0)
    assert rep.quadratic["precondition"]["holds"] == 0.0 and rep.quadratic["mix"]["n"] == 0
    text = rep.table()
    assert "precondition" in text and "3.5 ± 0.7" in text and "universal vector beats" in text


def test_pareto_front_on_a_hand_made_frame():
    df = pd.DataFrame({"ermse_norm": [0.8, 0.9, 0.7, 0.7, 1.2, 0.8, float("nan")],
                       "acc_norm": [1.0, 1.0, 0.9, 0.85, 1.05, 1.0, 1.2]})
    assert pareto_front(df).tolist() == [True, False, True, False, True, True, False]


def test_tradeoff_frame_one_point_per_method_and_pair():
    frame = tradeoff_frame(_table(), 0.7)
    assert len(frame) == 36 and set(frame["method"]) == {"plain", "precondition", "mix"}


def test_tradeoff_frame_normalises_and_marks_the_known_front():
    """Five (method, pair) points whose front is known by hand; a row at another λ2 is left out."""
    points = {  # method: (accuracy, E-RMSE) against θ_ftᵀ's (0.5, 2.0)
        "a": (0.50, 1.6), "b": (0.50, 1.8), "c": (0.45, 1.4), "d": (0.425, 1.5), "e": (0.525, 2.4)}
    rows = [{"source": "s", "target": "t", "seed": 0, "variant": "paper", "alpha": 0.8, "lambda2": 0.7, "method": m,
             "accuracy": acc, "accuracy_ft_target": 0.5, "ermse": e, "ermse_ft_target": 2.0}
            for m, (acc, e) in points.items()]
    rows.append({**rows[0], "lambda2": 1.0, "method": "a", "accuracy": 0.9, "ermse": 0.1})  # would dominate all
    frame = tradeoff_frame(pd.DataFrame(rows), 0.7).set_index("method")
    assert sorted(frame.index) == ["a", "b", "c", "d", "e"]
    assert frame["acc_norm"].to_dict() == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.9, "d": 0.85, "e": 1.05})
    assert frame["ermse_norm"].to_dict() == pytest.approx({"a": 0.8, "b": 0.9, "c": 0.7, "d": 0.75, "e": 1.2})
    # b is dominated by a (same accuracy, worse E-RMSE), d by c (lower accuracy, worse E-RMSE)
    assert frame["pareto"].to_dict() == {"a": True, "b": False, "c": True, "d": False, "e": True}


def test_study_with_two_methods_has_both_rows_per_pair():
    """The smoke study with eq. 8 and the universal mix: one row per (pair, method), plain's references shared."""
    from _smoke import METHOD_DOMAINS, smoke_method_study
    from diag.table import load_study
    from diag.study.run import run_study, StudySettings

    store, out, df = smoke_method_study()
    assert sorted(df.groupby(["source", "target"])["method"].apply(sorted).map(tuple).unique()) == [("mix", "plain")]
    assert len(df) == 2 * len(METHOD_DOMAINS) * (len(METHOD_DOMAINS) - 1)
    plain, mixed = (df[df["method"] == m].set_index(["source", "target"]).sort_index() for m in ("plain", "mix"))
    for col in ("accuracy_ft_target", "ermse_ft_target", "ermse_meanmap", "ermse_random"):
        assert mixed[col].equals(plain[col])  # the references and controls are the plain row's
    assert mixed["ermse_plain"].equals(plain["ermse"])  # plain eq. 8 beside the method is plain's own row
    assert mixed["repair_choice"].eq("universal").all() and mixed["pair_key"].ne(plain["pair_key"]).all()
    assert len(load_study(out)) == len(plain) and len(load_study(out, method=None)) == len(df)
    timings = (out / "pairs.csv.timings.json").read_bytes()  # wall-clock seconds per row, outside the table
    again = run_study(store, METHOD_DOMAINS, StudySettings(lambda2s=(0.7,), curvature=False, methods=("plain", "mix")),
                      out_dir=out, progress=False)  # resumed: nothing recomputed, same rows
    assert (out / "pairs.csv.timings.json").read_bytes() == timings
    pd.testing.assert_frame_equal(again, df)


RANKED_ERMSE = {0: {"A": 0.7, "B": 0.78, "C": 0.9}, 1: {"A": 0.9, "B": 0.9, "C": 0.9}}


def test_method_report_universal_vs_ranked_mix_vs_ranked_source():
    """(c) with both mixes: wins against the ranker's source and against each other, per seed, mean ± sd."""
    rows = [_row("mix-ranked", seed, k, accuracy=0.97, ermse=RANKED_ERMSE[seed][PAIRS[k][1]], corr_img=0.3)
            for seed in (0, 1) for k in range(6)]
    rep = method_report(pd.concat([_table(), pd.DataFrame(rows)], ignore_index=True), 0.7)
    u0, u1 = rep.universal[0], rep.universal[1]
    assert (u0["universal_wins"], u0["ranked_wins"], u0["ranked_beats_universal"]) == (2, 2, 2)
    assert (u1["universal_wins"], u1["ranked_wins"], u1["ranked_beats_universal"]) == (2, 0, 0)
    assert {t: v["winner"] for t, v in u0["per_target"].items()} == {"A": "ranked", "B": "ranked", "C": "universal"}
    assert {t: v["winner"] for t, v in u1["per_target"].items()} == {"A": "universal", "B": "source",
                                                                     "C": "universal"}
    assert "mix-ranked" in rep.per_seed
    text = rep.table()
    assert "ranker-weighted mix beats the ranker's single source (cos_ft proxy) on 1.0 ± 1.4 of 3" in text
    assert "ranker-weighted mix beats the universal vector" in text
