"""The card's risk calibrated on known pairs (diag.decide.card_scale)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from diag.decide.card_scale import fit_card_scale


def risks(spread: float, n_dom: int = 6, seed: int = 0, scale: float = 20.0) -> pd.DataFrame:
    """R_exact = scale · R_diag · exp(N(0, spread²)) on every ordered pair."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_dom):
        for t in range(n_dom):
            if s != t:
                diag = rng.uniform(0.01, 1.0)
                rows.append({"source": f"d{s}", "target": f"d{t}", "risk_diag": diag,
                             "risk_exact": scale * diag * math.exp(spread * rng.normal())})
    return pd.DataFrame(rows)


def test_a_steady_bias_is_calibrated_away():
    cal = fit_card_scale(risks(0.05))
    assert abs(math.log(cal.scale / 20.0)) < 0.05 and cal.loto_within == 1.0 and cal.n_targets == 6
    assert cal.apply(2.0) == 2.0 * cal.scale and "20" in cal.note()


def test_a_scattered_ratio_says_so():
    """log-ratio sd 1: a single scale cannot hold most pairs within ×1.5 (P(|N(0,1)| ≤ 0.405) ≈ 0.31)."""
    cal = fit_card_scale(risks(1.0))
    assert cal.loto_within < 0.5 and 0.7 < cal.log_sd < 1.3


def test_the_target_is_left_out():
    table = risks(0.05)
    held = fit_card_scale(table, target="d0")
    table.loc[(table["target"] == "d0") | (table["source"] == "d0"), "risk_exact"] *= 100.0
    again = fit_card_scale(table, target="d0")
    assert held == again and held.n_pairs == 5 * 4
    assert fit_card_scale(table).scale > held.scale  # with d0's pairs the median moves


def test_too_few_pairs_or_no_exact_risk():
    assert fit_card_scale(risks(0.05, n_dom=2)) is None
    assert fit_card_scale(risks(0.05).drop(columns=["risk_exact"])) is None
    assert fit_card_scale(risks(0.05).assign(risk_diag=-1.0)) is None


def test_risk_card_scaled_only_by_rows_of_its_own_form():
    """Rows of an eigenpair card (4× low) do not calibrate a K-FAC card (1×); a table that does not say which
    form made risk_card gives a K-FAC card no scale; without a form every row counts."""
    eig = risks(0.05, scale=4.0).rename(columns={"risk_diag": "risk_card"}).assign(card_form="eig")
    kfac = risks(0.05, seed=1, scale=1.0).rename(columns={"risk_diag": "risk_card"}).assign(card_form="kfac")
    both = pd.concat([eig, kfac], ignore_index=True)
    assert abs(math.log(fit_card_scale(both, None, "risk_card", "kfac").scale)) < 0.05
    assert abs(math.log(fit_card_scale(both, None, "risk_card", "eig").scale / 4.0)) < 0.05
    assert fit_card_scale(both.drop(columns=["card_form"]), None, "risk_card", "kfac") is None
    assert fit_card_scale(both, None, "risk_card").n_pairs == len(both)


def test_the_column_whose_scale_held_best_calibrates():
    """risk_card of the card's form holds within ×1.5 (log sd 0.05), risk_diag does not (sd 1): the card's own
    risk is scaled and the note names it; with only the diagonal steady, the diagonal is."""
    from diag.decide.card_scale import calibrated_card_risk

    train = risks(0.05, scale=1.2).rename(columns={"risk_diag": "risk_card"}).assign(card_form="kfac")
    train["risk_diag"] = train["risk_exact"] / 20.0 * np.exp(np.random.default_rng(3).normal(size=len(train)))
    out = pd.DataFrame({"risk_card": [1.0, 2.0], "risk_diag": [0.05, 0.1]})
    notes: list[str] = []
    risk = calibrated_card_risk(out, train, notes, "kfac")
    assert "× risk_card" in notes[0] and risk == pytest.approx([1.2, 2.4], rel=0.05)
    notes = []
    calibrated_card_risk(out, train, notes, "eig")  # no eig rows: the diagonal's scale, the only one left
    assert "× risk_diag" in notes[0]
    notes = []
    assert calibrated_card_risk(out, None, notes, "kfac") == [1.0, 2.0] and "not calibrated" in notes[0]
