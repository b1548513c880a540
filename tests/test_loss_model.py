"""The loss model λ·gᵀτ + ½λ²R: written once, stored in the card, cross-fitted, calibrated against measurements."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from diag.curvature import HessianCard, HessianOperator, build_card, quadratic_check
from diag.curvature.risk import loss_model
from diag.decide.loss_model import calibrate, calibration_text, predicted_vs_measured
from diag.decide.rules import lambda2_from_predicted_drop, quadratic_lambda_max


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in (6, 4, 5)]
    return model, data


def test_loss_model_and_its_lambda_cap_hand_values():
    assert loss_model(0.5, 2.0, 0.1) == pytest.approx(0.05 + 0.25)
    assert loss_model(0.5, 2.0, None) == loss_model(0.5, 2.0) == pytest.approx(0.25)
    # R = 2, gᵀτ = 0.1, b = 0.1: λ = (−0.1 + √(0.01 + 0.4)) / 2
    lam = quadratic_lambda_max(2.0, 0.1, 0.1)
    assert lam == pytest.approx((-0.1 + math.sqrt(0.41)) / 2, rel=1e-12)
    assert loss_model(lam, 2.0, 0.1) == pytest.approx(0.1, rel=1e-12)
    assert quadratic_lambda_max(2.0, 0.1, -0.1) > quadratic_lambda_max(2.0, 0.1) > lam  # g < 0 allows more
    assert quadratic_lambda_max(0.0, 0.1, 0.2) == pytest.approx(0.5) and quadratic_lambda_max(0.0, 0.1, -1) == math.inf
    # concave: top −g²/(2R) = 0.01/4 = 0.0025 stays within 0.1 → never over; over 0.001 → the smaller root
    assert quadratic_lambda_max(-2.0, 0.1, 0.1) == math.inf
    small = quadratic_lambda_max(-2.0, 0.001, 0.1)
    assert loss_model(small, -2.0, 0.1) == pytest.approx(0.001) and small < 0.05  # the top is at λ = 0.05
    # a predicted λ2 never beyond where the loss model holds
    assert lambda2_from_predicted_drop(0.0, 0.05) == pytest.approx(1.2)
    assert lambda2_from_predicted_drop(0.0, 0.05, valid_up_to=0.75) == pytest.approx(0.7)


def test_quadratic_check_is_cross_fitted():
    """g and H from one set of images, the measured change from another (never the same)."""
    model, data = _problem()
    fit, score = data[:2], data[2:]
    op = HessianOperator(model, fit, engine="fwd-rev")
    tau = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rows = quadratic_check(model, fit, tau, ts=(0.1, 0.5), op=op, score_data=score)
    g_fit, H_fit = op.gradient(), op.to_dense()
    X, Y = score[0]
    params = dict(model.named_parameters())
    shifted = lambda t: {n: p + t * d for (n, p), d in zip(params.items(), op.unflatten(tau).values())}  # noqa: E731
    L = lambda ps: float(nn.functional.cross_entropy(torch.func.functional_call(model, ps, (X,)), Y).detach())  # noqa: E731
    for r in rows:
        assert r.first_order == pytest.approx(r.t * float(g_fit @ tau), rel=1e-10)
        assert r.second_order == pytest.approx(0.5 * r.t ** 2 * float(tau @ H_fit @ tau), rel=1e-10)
        assert r.measured == pytest.approx(L(shifted(r.t)) - L(params), rel=1e-10)  # scored on the other images
    in_sample = quadratic_check(model, fit, tau, ts=(0.1,), op=op)[0]
    assert in_sample.measured != pytest.approx(rows[0].measured, rel=1e-3)


def test_card_stores_the_gradient(tmp_path):
    model, data = _problem()
    op = HessianOperator(model, data, engine="fwd-rev")
    card = build_card(op, 3, residual_diag="exact")
    tau = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert card.first_order(tau) == pytest.approx(float(op.gradient() @ tau), rel=1e-12)
    assert card.to_dict()["has_gradient"]
    card.save(tmp_path / "card.safetensors")
    back = HessianCard.load(tmp_path / "card.safetensors")
    assert torch.equal(back.gradient, card.gradient) and back.first_order(op.unflatten(tau)) == card.first_order(tau)
    old = HessianCard(card.eigvals, card.eigvecs, card.residual_diag, card.param_names, card.param_shapes)
    old.save(tmp_path / "old.safetensors")  # a card from before g was stored: no first-order term, said as None
    assert HessianCard.load(tmp_path / "old.safetensors").first_order(tau) is None


def _rows(measured_factor):
    """Study rows of 3 pairs × λ2 ∈ {0.4, …, 0.8}: gᵀτ, R per pair; measured = the model × factor(λ)."""
    pairs = [("a", "t", 0.05, 1.0), ("b", "t", -0.02, 2.0), ("c", "t", 0.01, 0.5)]
    rows = []
    for s, t, g, r in pairs:
        for lam in (0.4, 0.5, 0.6, 0.7, 0.8):
            rows.append({"source": s, "target": t, "method": "plain", "seed": 0, "lambda2": lam, "risk_exact": r,
                         "grad_dot_tau": g, "loss_increase_val": measured_factor(lam) * (lam * g + 0.5 * lam ** 2 * r)})
    return pd.DataFrame(rows)


def test_calibration_hand_derived_and_where_it_fails():
    # exact up to λ2 = 0.6, measured twice the prediction from 0.7 on
    cal = calibrate(predicted_vs_measured(_rows(lambda lam: 1.0 if lam < 0.65 else 2.0)))
    assert cal["n"] == 15 and cal["first_order"]
    assert cal["median_ratio"] == pytest.approx(1.0) and cal["within"] == pytest.approx(9 / 15)
    assert cal["valid_up_to"] == pytest.approx(0.6) and cal["fails_from"] == pytest.approx(0.7)
    assert cal["within_valid"] == pytest.approx(1.0)
    assert [p["within"] for p in cal["per_lambda"]] == [1.0, 1.0, 1.0, 0.0, 0.0]
    # pair b at λ = 0.4: predicted −0.008 + 0.16 = 0.152; ½λ²R alone 0.16 ⇒ ratio 0.95 (within)
    fit = predicted_vs_measured(_rows(lambda lam: 1.0))
    b04 = fit[(fit["source"] == "b") & (fit["lambda2"] == 0.4)].iloc[0]
    assert b04["predicted"] == pytest.approx(0.152) and b04["predicted_second_order"] == pytest.approx(0.16)
    assert calibrate(fit)["spearman"] == pytest.approx(1.0) and calibrate(fit)["fails_from"] is None
    text = " ".join(calibration_text(cal))
    assert "fails from λ2 = 0.7" in text and "capped at 0.6" in text


def test_calibration_without_first_order_term_says_so():
    rows = _rows(lambda lam: 1.0).drop(columns="grad_dot_tau")
    cal = calibrate(predicted_vs_measured(rows))
    assert not cal["first_order"] and cal["median_ratio"] == cal["second_order"]["median_ratio"]
    assert "first-order term missing" in calibration_text(cal)[0]
    # fails at the smallest λ: ratio 2 everywhere
    bad = calibrate(predicted_vs_measured(_rows(lambda lam: 2.0)))
    assert bad["valid_up_to"] == 0.0 and bad["fails_from"] == pytest.approx(0.4)
    assert "no λ2 should be chosen from it" in calibration_text(bad)[1]


def test_measured_change_carries_its_paired_se_and_halves():
    """The change's se is sd/√N of the per-image differences; the halves are the even and odd images' means;
    gᵀτ's se is that of the per-image directional derivatives."""
    model, data = _problem()
    fit, score = data[:2], data[2:]
    op = HessianOperator(model, fit, engine="fwd-rev")
    tau = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    row = quadratic_check(model, fit, tau, ts=(0.5,), op=op, score_data=score)[0]
    X, Y = score[0]
    params = dict(model.named_parameters())
    shifted = {n: p + 0.5 * d for (n, p), d in zip(params.items(), op.unflatten(tau).values())}
    per = lambda ps, x, y: nn.functional.cross_entropy(torch.func.functional_call(model, ps, (x,)), y,  # noqa: E731
                                                       reduction="none").detach()
    d = per(shifted, X, Y) - per(params, X, Y)
    assert row.measured_se == pytest.approx(float(d.std(unbiased=True)) / math.sqrt(d.numel()), rel=1e-10)
    assert row.measured_half_a == pytest.approx(float(d[0::2].mean()), rel=1e-10)
    assert row.measured_half_b == pytest.approx(float(d[1::2].mean()), rel=1e-10)
    # per-image directional derivatives on the fitting images, by central differences of each image's loss
    h = 1e-6
    gi = []
    for x, y in fit:
        plus = {n: p + h * v for (n, p), v in zip(params.items(), op.unflatten(tau).values())}
        minus = {n: p - h * v for (n, p), v in zip(params.items(), op.unflatten(tau).values())}
        gi.append((per(plus, x, y) - per(minus, x, y)) / (2 * h))
    gi = torch.cat(gi)
    assert row.g_tau == pytest.approx(float(gi.mean()), rel=1e-6)
    assert row.g_tau_se == pytest.approx(float(gi.std(unbiased=True)) / math.sqrt(gi.numel()), rel=1e-5)


def test_calibration_judges_by_what_the_measurement_can_decide():
    """With each measurement's se, a prediction off by ×2 counts where it lies within 1.96 se; the halves give
    the measurement's own agreement; without se the strict ×1.5 criterion stays."""
    rows = _rows(lambda lam: 2.0)
    # se: large at λ ≤ 0.5 (the ×2 miss lies inside 1.96 se), tiny above
    rows["loss_increase_val_se"] = [abs(m) if lam <= 0.5 else 1e-9 for m, lam in zip(rows["loss_increase_val"],
                                                                                    rows["lambda2"])]
    fit = predicted_vs_measured(rows)
    cal = calibrate(fit)
    assert cal["criterion"] == "consistent" and cal["within"] == 0.0
    assert cal["consistent"] == pytest.approx(6 / 15)  # the miss is half the measurement, ≤ 1.96 se at λ 0.4, 0.5
    assert cal["valid_up_to"] == pytest.approx(0.5) and cal["fails_from"] == pytest.approx(0.6)
    assert "1.96 se of the measurement" in calibration_text(cal)[0]
    # the control 'no change' passes wherever the noise covers the whole change (λ ≤ 0.5): only from 0.6 on
    # can the measurement tell a model from it
    assert [p["zero"] for p in cal["per_lambda"]] == [1.0, 1.0, 0.0, 0.0, 0.0] and cal["decides_from"] == 0.6
    assert "tells the model from it only from λ2 = 0.6 on" in " ".join(calibration_text(cal))
    assert calibrate(predicted_vs_measured(_rows(lambda lam: 2.0)))["decides_from"] == 0.4  # strict: 0 never within
    assert calibrate(predicted_vs_measured(_rows(lambda lam: 2.0)))["criterion"] == "within"
    # the measurement against itself: halves 1 and 1.2 (within ×1.5), or 1 and 2 (not), per λ
    fit["measured_half_a"] = 1.0
    fit["measured_half_b"] = [1.2 if lam < 0.65 else 2.0 for lam in fit["lambda2"]]
    rt = calibrate(fit)["retest"]
    assert rt["within"] == pytest.approx(9 / 15) and rt["per_lambda"][0.4] == 1.0 and rt["per_lambda"][0.8] == 0.0
    assert "the measurement against itself" in " ".join(calibration_text(calibrate(fit)))
