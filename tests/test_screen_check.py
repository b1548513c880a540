"""The screen's verdicts scored against the test outcome, leave one target out (diag.decide.screen_check)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diag.decide.screen_check import validate_screen
from train.errors import DataError


def grid_study(n_dom=8, seeds=2, seed=0, test_drop=None, test_drop_at=None):
    """Plain eq. 8 rows on a λ2 grid: "good" pairs (s + t even) lose 1 % val accuracy at λ2 = 0.7 (∝ λ2²) and
    explain better (E-RMSE ÷ θ_ftᵀ = 1 − 0.4 cos_ft, cos_ft ≈ 0.5); "bad" pairs lose 30 % at every λ2.
    The test split behaves as val does, unless ``test_drop`` sets the good pairs' test accuracy drop (at the λ2 of
    ``test_drop_at`` only, when given)."""
    rng = np.random.default_rng(seed)
    rows = []
    for run in range(seeds):
        for s in range(n_dom):
            for t in range(n_dom):
                if s == t:
                    continue
                good = (s + t) % 2 == 0
                cos = rng.uniform(0.45, 0.55) if good else rng.uniform(0.0, 0.1)
                for lam in (0.4, 0.7, 1.0):
                    drop = 0.01 * (lam / 0.7) ** 2 if good else 0.3
                    ermse = 1.0 + (-0.2 if good else 0.1) + 0.01 * rng.normal()
                    hit = test_drop is not None and good and (test_drop_at is None or lam == test_drop_at)
                    test = test_drop if hit else drop
                    rows.append({"seed": run, "lambda2": lam, "source": f"d{s}", "target": f"d{t}", "cos_ft": cos,
                                 "ermse_star_source": 0.5, "ermse_ft_target": 1.0, "ermse": ermse,
                                 "accuracy_ft_target": 0.9, "accuracy": 0.9 * (1 - test),
                                 "accuracy_val_ft_target": 0.8, "accuracy_val": 0.8 * (1 - drop),
                                 "acc_drop_val_se": 0.001})
    return pd.DataFrame(rows)


def test_screen_verdicts_against_the_test_outcome():
    # the good pairs are set by the pair (s + t even), not by the source: a feature predictor (ridge on cos_ft) sees
    # it, the sources' record cannot
    checks, scored = validate_screen(grid_study(), model="ridge")
    assert [c.kind for c in checks] == ["plain", "recommended"]
    assert len(scored) == 2 * 8 * 7 and set(scored["seed"]) == {0, 1}
    bad = scored[[(int(s[1:]) + int(t[1:])) % 2 == 1 for s, t in zip(scored["source"], scored["target"])]]
    assert (bad["plain"] == "no-go").all() and (bad["recommended"] == "no-go").all()  # 30 % drop at every λ2
    assert (bad["recommended_lambda2"] == 0).all()
    for c in checks:
        assert sum(v["success"] + v["failure"] for v in c.confusion.values()) == c.n == len(scored)
        assert c.confusion["go"]["success"] > 0 and c.go_precision == 1.0 and c.nogo_recall == 1.0
        assert c.go_precision_ci[0] < 1.0 and c.n_seeds == 2
        assert "precision of go 1.00" in "\n".join(c.lines())
    good = scored.drop(bad.index)
    assert (good["recommended_lambda2"] == 1.0).all()  # 2 % drop at λ2 = 1: within the 5 % budget


def test_verdicts_never_read_the_held_out_targets_test_split():
    """Scrambling the test numbers of target d0 leaves d0's verdicts as they were (other targets may learn from
    them: d0's pairs are known pairs when another target is held out)."""
    table = grid_study()
    _, before = validate_screen(table)
    d0 = table["target"] == "d0"
    rng = np.random.default_rng(1)
    table.loc[d0, "ermse"] = rng.uniform(0.5, 1.5, int(d0.sum()))
    table.loc[d0, "accuracy"] = rng.uniform(0.1, 0.9, int(d0.sum()))
    _, after = validate_screen(table)
    cols = ["plain", "recommended", "recommended_lambda2"]
    assert before.loc[before["target"] == "d0", cols].equals(after.loc[after["target"] == "d0", cols])
    assert not before[["plain_success"]].equals(after[["plain_success"]])


def test_a_screen_whose_go_fails_on_test_scores_zero_precision():
    """Val says 1 % drop, the test split loses 30 %: every go is a failure, and none of those failures is no-go."""
    for c in validate_screen(grid_study(test_drop=0.3), model="ridge")[0]:
        assert c.confusion["go"]["failure"] > 0 and c.go_precision == 0.0 and c.nogo_recall < 1.0


def test_screen_validation_needs_val_accuracies():
    with pytest.raises(DataError, match="val accuracies"):
        validate_screen(grid_study().drop(columns=["accuracy_val"]))


def test_every_lambda_scores_the_plain_verdict_at_its_own_lambda():
    """Good pairs lose 10 % test accuracy at λ2 = 1 only (val: 2 %): the screen says go at every λ2 (the val drop at
    0.7 scaled by (λ/0.7)² stays within the budget), and only the go's at λ2 = 1 fail on test."""
    checks, scored = validate_screen(grid_study(test_drop=0.1, test_drop_at=1.0), model="ridge", every_lambda=True)
    assert [(c.kind, c.lambda2) for c in checks] == [("plain", 0.7), ("recommended", None), ("plain", 0.4),
                                                     ("plain", 1.0)]
    plain07, _, at04, at10 = checks
    assert plain07.go_precision == at04.go_precision == 1.0 and at10.go_precision == 0.0
    assert at04.confusion["go"]["success"] == at10.confusion["go"]["failure"] == (scored["plain@1"] == "go").sum() > 0
    assert at10.n == at04.n == plain07.n == len(scored)
    assert "plain eq. 8 at λ2 = 1: go 0/" in at10.line() and "precision of go 0.00" in at10.line()
    assert checks[:2] == validate_screen(grid_study(test_drop=0.1, test_drop_at=1.0), model="ridge")[0]  # unchanged
