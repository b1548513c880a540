"""Verdicts with error bars: the paired standard error of an accuracy drop, the upper-bound rule, "val too small"."""

import math

import numpy as np
import pandas as pd
import pytest

from diag.decide.rules import drop_decision, method_verdict, screen_verdict
from diag.stats.paired import UPPER_Z, images_needed, paired_change, paired_drop
from train.errors import DataError

# 10 images: 6 right with and without the vector, 2 lost, 1 gained, 1 wrong twice
BASE = [1] * 6 + [1, 1] + [0] + [0]
WITH = [1] * 6 + [0, 0] + [1] + [0]


def test_paired_se_closed_form_on_a_constructed_example():
    d = paired_drop(BASE, WITH)
    assert (d.n, d.n_lost, d.n_gained) == (10, 2, 1)
    assert d.drop == pytest.approx(1 - 0.7 / 0.8, rel=1e-15)
    # ψ = (a_v b − a_b v)/a_b²: both right −0.1/0.64, lost 0.7/0.64, gained −1/0.8, both wrong 0
    ss = 6 * (0.1 / 0.64) ** 2 + 2 * (0.7 / 0.64) ** 2 + (1 / 0.8) ** 2
    assert ss == pytest.approx(4.1015625, rel=1e-15)
    assert d.se == pytest.approx(math.sqrt(ss / (10 * 9)), rel=1e-13)
    assert d.upper() == pytest.approx(d.drop + UPPER_Z * d.se)


def test_paired_se_reduces_to_the_binomial_when_the_reference_is_always_right():
    v = np.array([1] * 30 + [0] * 10)
    d = paired_drop(np.ones(40), v)
    assert d.drop == pytest.approx(0.25) and d.se == pytest.approx(float(v.std(ddof=1)) / math.sqrt(40), rel=1e-13)
    # no discordant image: no spread; a_b = 0: undefined
    same = paired_drop(BASE, BASE)
    assert same.drop == 0.0 and same.se == 0.0
    assert math.isnan(paired_drop([0, 0], [1, 0]).drop)
    with pytest.raises(DataError):
        paired_drop([1, 0], [1])
    with pytest.raises(DataError):
        paired_drop([1, 2], [1, 0])


def test_images_needed_from_the_observed_spread():
    # σ = 0.02·√100 = 0.2, gap 0.02: ⌈(1.6449 · 0.2 / 0.02)²⌉ = ⌈270.56⌉
    assert images_needed(0.03, 0.02, 100, 0.05) == math.ceil((UPPER_Z * 10) ** 2) == 271
    assert images_needed(0.05, 0.02, 100, 0.05) is None and images_needed(0.01, 0.0, 100, 0.05) is None


def test_drop_decision_upper_bound_rule_and_too_small_message():
    assert drop_decision(0.03, 0.005, 400, 0.05)[0] == "within"  # 0.03 + 1.645·0.005 = 0.038
    assert drop_decision(0.10, 0.01, 400, 0.05)[0] == "over"
    state, text = drop_decision(0.03, 0.02, 100, 0.05)  # point within, upper bound 0.063 is not
    assert state == "undecided"
    assert "too small to decide" in text and "about 271 val images" in text
    assert drop_decision(0.03, math.nan, 100, 0.05)[0] == "undecided"


def _method_row(se):
    return pd.Series({"safe": True, "drop_measured": True, "method": "plain", "method_param": "0.7",
                      "method_scale": 0.7, "method_acc_drop": 0.03, "method_acc_drop_se": se, "method_n_val": 100,
                      "predicted_gain": 0.2, "predicted_gain_lo": 0.05, "predicted_gain_hi": 0.35})


def test_go_needs_the_upper_bound_within_the_budget():
    assert method_verdict(_method_row(0.005), 0.05)[0] == "go"
    verdict, reasons = method_verdict(_method_row(0.02), 0.05)
    assert verdict == "caution" and any("too small to decide" in r for r in reasons)
    predicted = _method_row(math.nan).copy()
    predicted["drop_measured"] = False  # a predicted drop has no paired error bar: the point value decides
    assert method_verdict(predicted, 0.05)[0] == "go"


def test_screen_verdict_uses_the_upper_bound():
    table = pd.DataFrame({"source": ["a", "b", "c", "d"], "target": ["b", "a", "d", "c"], "cos_ft": [0.1, 0.2, 0.3, 0.4]})
    row = pd.Series({"cos_ft": 0.5, "risk_exact": 1.0, "grad_dot_tau": 0.1, "measured_acc_drop": 0.03,
                     "measured_acc_drop_se": 0.005, "measured_n_val": 100, "predicted_acc_drop": 0.0,
                     "predicted_ermse_norm": 0.9, "predicted_ermse_norm_lo": 0.8, "predicted_ermse_norm_hi": 1.0,
                     "lambda2": 0.7})
    verdict, reasons = screen_verdict(row, table, "t", 0.7, 0.05)
    assert verdict == "go" and any("λ2·gᵀτ + ½λ2²R" in r for r in reasons)
    wide = row.copy()
    wide["measured_acc_drop_se"] = 0.02
    verdict, reasons = screen_verdict(wide, table, "t", 0.7, 0.05)
    assert verdict == "caution" and any("about 271 val images" in r for r in reasons)


def test_paired_change_is_the_mean_difference_with_its_paired_se():
    ref, new = [1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 3.5, 5.0]  # differences 0.5, 0, 0.5, 1: mean 0.5, sd √(1/6)
    mean, se = paired_change(ref, new)
    assert mean == pytest.approx(0.5) and se == pytest.approx(math.sqrt(1 / 6) / 2)
    assert math.isnan(paired_change([1.0], [2.0])[1])
    with pytest.raises(DataError):
        paired_change([1.0, 2.0], [1.0])
