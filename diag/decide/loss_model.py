"""How well the loss model predicts the measured loss change, and from which λ it fails.

The loss model (:func:`diag.curvature.risk.loss_model`) predicts the target's loss change when
λτ*ˢ is added to θ_ftᵀ: ΔL̂(λ) = λ·gᵀτ + ½λ²·R, with g and R = τᵀHτ of the target loss at
θ_ftᵀ estimated on the curvature's images (the target's ``train`` images,
:class:`diag.features.pair_features.CurvatureSettings`). The study measures the change on other
images, the target's ``val`` split (``loss_increase_val``: val cross-entropy at λ minus
θ_ftᵀ's), so the model is cross-fitted: never estimated and scored on the same images.

:func:`predicted_vs_measured` gives one row per pair × λ (× run); :func:`calibrate` summarises
them: the ratio ρ = measured ÷ predicted (median), the share of rows with ρ within
×:data:`WITHIN` (1/1.5 ≤ ρ ≤ 1.5: a prediction of the wrong sign is never within), Spearman's
rank correlation of predicted and measured, the same per λ, and ``valid_up_to``: the largest λ of
the grid at which — and at every smaller λ — at least :data:`VALID_SHARE` of the rows are within
×1.5 (the one size rule, :func:`diag.transfer.budget.safe_sizes`, with the share of rows outside
×1.5 as the "drop" and 1 − :data:`VALID_SHARE` as the budget). ``fails_from`` is the next grid λ:
from there on the model is not to be trusted, and λ2 recommendations made from a prediction stay
at or below ``valid_up_to`` (:func:`diag.decide.rules.lambda2_from_predicted_drop`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from diag.curvature.risk import loss_model
from diag.stats.correlation import spearman
from diag.table import PLAIN
from diag.transfer.budget import safe_sizes

__all__ = ["CONSISTENT_Z", "GATE_Z", "VALID_SHARE", "WITHIN", "agreement", "calibrate", "calibration_text",
           "gated_g_tau", "logit_model_agreement", "predicted_vs_measured", "retest"]

#: A prediction is "within" when measured ÷ predicted lies in [1/WITHIN, WITHIN].
WITHIN = 1.5
#: A prediction is "consistent" with a measurement with standard error se when within ×WITHIN or within
#: CONSISTENT_Z·se of it (two-sided 95 %).
CONSISTENT_Z = 1.959963984540054
#: The first-order term λ·gᵀτ is kept by the gated model only where |gᵀτ| ≥ GATE_Z times its standard error.
GATE_Z = 2.0
#: The model is valid at a λ when at least this share of its rows (and of every smaller λ's) is within.
VALID_SHARE = 0.8

_RUN = ("variant", "alpha", "seed")


def gated_g_tau(g_tau: float, se: float, z: float = GATE_Z) -> float:
    """gᵀτ where it stands out of its own noise (|gᵀτ| ≥ z·se), else 0: the first-order term of the gated model."""
    return g_tau if math.isfinite(se) and abs(g_tau) >= z * se else 0.0


def predicted_vs_measured(table: pd.DataFrame, risk: str = "risk_exact") -> pd.DataFrame:
    """One row per plain eq. 8 pair × λ2 (× run) of a study table: the loss model against the val loss change.

    Args:
        table: study rows with ``lambda2``, ``loss_increase_val``, ``risk`` and (when the study stored
            it) ``grad_dot_tau``; rows of other methods are ignored.
        risk: the R column of the model (``risk_exact``, ``risk_card`` or ``risk_diag``).

    Returns:
        Columns source, target, the run columns present, lambda2, g_tau (NaN: not stored), risk,
        predicted (λ·gᵀτ + ½λ²R, with gᵀτ = 0 where NaN), predicted_second_order (½λ²R),
        measured and (when the study stored ``loss_increase_val_se``) measured_se; rows without a finite measured change or R are dropped.
    """
    rows = table[table["method"] == PLAIN] if "method" in table else table
    keep = [c for c in ("source", "target", *_RUN) if c in rows]
    g = pd.to_numeric(rows["grad_dot_tau"], errors="coerce") if "grad_dot_tau" in rows \
        else pd.Series(np.nan, index=rows.index)
    r = pd.to_numeric(rows[risk], errors="coerce") if risk in rows else pd.Series(np.nan, index=rows.index)
    lam = rows["lambda2"].astype(float)
    measured = pd.to_numeric(rows.get("loss_increase_val", pd.Series(np.nan, index=rows.index)), errors="coerce")
    out = rows[keep].copy()
    out["lambda2"], out["g_tau"], out["risk"], out["measured"] = lam, g, r, measured
    out["predicted"] = [loss_model(a, b, None if math.isnan(c) else c) for a, b, c in zip(lam, r, g)]
    out["predicted_second_order"] = [loss_model(a, b, None) for a, b in zip(lam, r)]
    if "loss_increase_val_se" in rows:  # studies from before it was stored have none: judged by ×1.5 alone
        out["measured_se"] = pd.to_numeric(rows["loss_increase_val_se"], errors="coerce")
    ok = np.isfinite(out["measured"]) & np.isfinite(out["risk"])
    return out[ok].reset_index(drop=True)


def agreement(predicted, measured, within: float = WITHIN, measured_se=None, z: float = CONSISTENT_Z) -> dict:
    """How well ``predicted`` matches ``measured``, row by row: n, median measured ÷ predicted, the share within
    ×``within`` (a prediction of the wrong sign is never within), Spearman (NaN below 3 rows or constant), and,
    given each measurement's standard error, ``consistent``: the share within ×``within`` or within ``z``
    standard errors of the measurement (NaN without se).

    The loss model's calibration and the card's fidelity (R_card against R_exact) are both scored with it.
    """
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    ratio = np.divide(m, p, out=np.full_like(m, np.nan), where=p != 0)
    inside = (ratio >= (1 - 1e-12) / within) & (ratio <= within * (1 + 1e-12))
    rho = math.nan
    if len(p) >= 3 and np.ptp(p) > 0 and np.ptp(m) > 0:
        rho = spearman(p, m).statistic
    finite = ratio[np.isfinite(ratio)]
    out = {"n": int(len(p)), "median_ratio": float(np.median(finite)) if finite.size else math.nan,
           "within": float(inside.mean()) if len(p) else math.nan, "spearman": float(rho), "consistent": math.nan}
    if measured_se is not None and len(p):
        se = np.asarray(measured_se, dtype=float)
        if np.isfinite(se).all():
            out["consistent"] = float((inside | (np.abs(p - m) <= z * se)).mean())
    return out


def _se(rows: pd.DataFrame):
    return rows["measured_se"] if "measured_se" in rows and np.isfinite(rows["measured_se"]).all() else None


def retest(rows: pd.DataFrame, within: float = WITHIN) -> dict | None:
    """The measurement against itself: how often the change measured on one half of the scoring images
    is within ×``within`` of the other half's (overall and per λ2). No prediction can be expected to
    match a measurement more often than the measurement matches itself, so a low share here means the
    strict ×1.5 criterion is beyond reach at this many images. None without the halves."""
    if not {"measured_half_a", "measured_half_b"} <= set(rows.columns) or not len(rows):
        return None
    out = {"within": agreement(rows["measured_half_a"], rows["measured_half_b"], within)["within"]}
    out["per_lambda"] = {float(lam): agreement(g["measured_half_a"], g["measured_half_b"], within)["within"]
                         for lam, g in rows.groupby("lambda2", sort=True)}
    return out


def calibrate(rows: pd.DataFrame, within: float = WITHIN, valid_share: float = VALID_SHARE) -> dict:
    """Predicted against measured loss change over the rows of :func:`predicted_vs_measured`.

    Rows with ``measured_se`` (each measurement's paired standard error) are judged by the criterion
    the measurement can decide: a prediction counts when it is within ×``within`` or within
    :data:`CONSISTENT_Z` standard errors of the measured change (``criterion`` ``"consistent"``);
    without it, within ×``within`` alone (``"within"``). Rows with the measurement's two halves
    also get :func:`retest`.

    Returns:
        ``{"n", "median_ratio", "within", "spearman", "consistent"}`` of the loss model over every row;
        ``second_order``: the same for ½λ²R alone (and ``gated``, for λ·gᵀτ kept only where
        |gᵀτ| ≥ :data:`GATE_Z` of its se, when the rows have ``predicted_gated``); ``first_order``:
        whether every row has gᵀτ; ``per_lambda``: one such dict per λ2 (with ``lambda2``);
        ``criterion``; ``zero``: the same share for the prediction "no change" (0), a control — where it
        passes as often, the measurement cannot tell the model from it (``zero`` per λ too);
        ``decides_from``: the smallest λ2 above every λ2 where "no change" meets the criterion on
        ≥ ``valid_share`` of rows (None: nowhere above); ``valid_up_to``: the largest λ2 where the model is valid by the criterion
        (module docstring; 0.0 when it fails at the smallest λ2, NaN without rows); ``fails_from``:
        the smallest λ2 above it (None: valid on the whole grid); ``within_valid``: the share meeting
        the criterion among the rows with λ2 ≤ ``valid_up_to``; ``retest``; ``factor``, ``z`` and
        ``valid_share``: the thresholds used.
    """
    se = _se(rows)
    crit = "within" if se is None else "consistent"
    out = {**agreement(rows["predicted"], rows["measured"], within, se),
           "second_order": agreement(rows["predicted_second_order"], rows["measured"], within, se),
           "first_order": bool(len(rows)) and bool(np.isfinite(rows["g_tau"]).all()),
           "factor": within, "z": CONSISTENT_Z, "valid_share": valid_share, "criterion": crit,
           "retest": retest(rows, within)}
    if "predicted_gated" in rows:
        out["gated"] = agreement(rows["predicted_gated"], rows["measured"], within, se)
    per = [{"lambda2": float(lam), **agreement(g["predicted"], g["measured"], within, _se(g)),
            "zero": agreement(np.zeros(len(g)), g["measured"], within, _se(g))[crit]}
           for lam, g in rows.groupby("lambda2", sort=True)]
    out["per_lambda"] = per
    undecided = [p["lambda2"] for p in per if p["zero"] >= valid_share]  # "no change" passes there too
    out["zero"] = agreement(np.zeros(len(rows)), rows["measured"], within, se)[crit]
    out["decides_from"] = min((p["lambda2"] for p in per if p["lambda2"] > max(undecided, default=-1.0)),
                              default=None)
    if not per:
        return {**out, "valid_up_to": math.nan, "fails_from": None, "within_valid": math.nan}
    lams = np.array([p["lambda2"] for p in per])
    valid = safe_sizes(lams, [1.0 - p[crit] for p in per], 1.0 - valid_share)
    up_to = float(lams[valid].max()) if valid.any() else 0.0
    above = lams[lams > up_to + 1e-12]
    inside = rows[rows["lambda2"] <= up_to + 1e-12]
    out.update(valid_up_to=up_to, fails_from=float(above.min()) if above.size else None,
               within_valid=agreement(inside["predicted"], inside["measured"], within, _se(inside))[crit]
               if len(inside) else math.nan)
    return out


def logit_model_agreement(rows: pd.DataFrame, within: float = WITHIN) -> dict | None:
    """The logit-space loss model (``predicted_logit``) against the measured change, and inside the range it
    declares valid itself (``logit_valid``: its expansion holds within ×1.5 on its own estimating images at
    that λ and every smaller one, decided without the scoring images).

    Returns:
        None without those columns; else :func:`agreement` over every row plus ``per_lambda`` (each with
        ``lambda2`` and, under ``declared``, the same over the rows declared valid at that λ, with their
        share ``declared_share``), ``declared`` (every declared row) and ``declared_share``.
    """
    if not {"predicted_logit", "logit_valid"} <= set(rows.columns) or not len(rows):
        return None
    valid = rows["logit_valid"].astype(bool)

    def score(part: pd.DataFrame) -> dict:
        return agreement(part["predicted_logit"], part["measured"], within, _se(part))

    per = []
    for lam, g in rows.groupby("lambda2", sort=True):
        ok = g["logit_valid"].astype(bool)
        per.append({"lambda2": float(lam), **score(g), "declared": score(g[ok]), "declared_share": float(ok.mean())})
    return {**score(rows), "per_lambda": per, "declared": score(rows[valid]), "declared_share": float(valid.mean())}


def _criterion_text(cal: dict) -> str:
    if cal["criterion"] == "consistent":
        return f"within ×{cal['factor']:g} or {cal['z']:.3g} se of the measurement"
    return f"within ×{cal['factor']:g}"


def calibration_text(cal: dict, estimated_on: str = "train", scored_on: str = "val") -> list[str]:
    """The calibration in plain lines (what the study report prints); g and H were estimated on the target's
    ``estimated_on`` images and the change measured on its ``scored_on`` images."""
    if not cal["n"]:
        return ["loss model: no rows with a measured val loss change and R (run `diag study --lambda-grid` with "
                "curvature)"]
    model = "λ·gᵀτ + ½λ²R" if cal["first_order"] else "½λ²R (this study stored no gᵀτ: first-order term missing)"
    so, crit = cal["second_order"], _criterion_text(cal)
    noise = "" if cal["criterion"] != "consistent" else (
        f"; {cal['consistent']:.0%} {crit} (½λ²R alone {so['consistent']:.0%}"
        + (f", gᵀτ kept only where |gᵀτ| ≥ {GATE_Z:g} se {cal['gated']['consistent']:.0%}" if "gated" in cal else "")
        + ")")
    lines = [f"loss model {model}, g and H on the target's {estimated_on} images, scored on its {scored_on} images "
             "(cross-fitted): "
             f"measured ÷ predicted median {cal['median_ratio']:.3g}, {cal['within']:.0%} of {cal['n']} pair × λ2 "
             f"rows within ×{cal['factor']:g}, Spearman {cal['spearman']:.3f} (½λ²R alone: median {so['median_ratio']:.3g}, "
             f"{so['within']:.0%} within, Spearman {so['spearman']:.3f}){noise}"]
    if cal.get("retest"):
        per = ", ".join(f"λ {lam:g}: {v:.0%}" for lam, v in cal["retest"]["per_lambda"].items())
        lines.append(f"the measurement against itself: one half of the {scored_on} images' change is within "
                     f"×{cal['factor']:g} of the other half's in {cal['retest']['within']:.0%} of rows ({per}) — the "
                     f"strict ×{cal['factor']:g} criterion asks more of a prediction than the measurement meets")
    if cal.get("decides_from") != min(p["lambda2"] for p in cal["per_lambda"]):
        per = ", ".join(f"λ {p['lambda2']:g}: {p[cal['criterion']]:.0%} vs {p['zero']:.0%}" for p in cal["per_lambda"])
        lines.append("control, the prediction 'no change' (0) scored the same way: "
                     + (f"the measurement tells the model from it only from λ2 = {cal['decides_from']:g} on"
                        if cal.get("decides_from") is not None else "it passes as often at every λ2")
                     + f" (model vs no change, per λ2: {per})")
    if cal["fails_from"] is None:
        lines.append(f"loss model valid on the whole λ2 grid (≥ {cal['valid_share']:.0%} of rows {crit} at every λ2)")
    elif cal["valid_up_to"] > 0:
        lines.append(f"loss model valid up to λ2 = {cal['valid_up_to']:g} ({cal['within_valid']:.0%} {crit} there); it "
                     f"fails from λ2 = {cal['fails_from']:g} on: predicted λ2 are capped at {cal['valid_up_to']:g}")
    else:
        lines.append(f"loss model fails from the smallest λ2 = {cal['fails_from']:g} on (< {cal['valid_share']:.0%} of rows "
                     f"{crit}): no λ2 should be chosen from it")
    return lines
