"""Decisions before deploying an explainability vector: λ2, the quadratic model, the verdict.

One module for every choice ``rank-sources``, ``screen`` and ``risk`` make; the CLI only
parses and prints.

* The loss model (paper eq. 12 with its first-order term, :func:`diag.curvature.risk.loss_model`):
  adding λτ raises the target loss by L(θ_ftᵀ + λτ) − L(θ_ftᵀ) ≈ λ·gᵀτ + ½ λ² R with
  R = τᵀ Hᵀ τ; the largest λ within a budget b is its root (:func:`quadratic_lambda_max`; with
  g = 0, λ_max = sqrt(2b / R)). Its measured fit and the λ from which it fails:
  :mod:`diag.decide.loss_model`. The same model in
  accuracy-drop units (drop(λ) = drop(λ_ref)·(λ/λ_ref)², i.e. R = 2·drop(λ_ref)/λ_ref²)
  turns a predicted drop at λ2 = 0.7 into a λ2 (:func:`lambda2_from_predicted_drop`).
* Measured λ2 (tier 2) is :mod:`diag.transfer.budget`: the λ grid on the target's ``val``
  images and the one rule that picks λ2 from it.
* The verdict (:func:`screen_verdict`, :func:`method_verdict`): go / caution / no-go from the drop,
  the predicted E-RMSE and where cos(τ_ftˢ, τ_ftᵀ) falls among the known pairs. A measured drop
  carries its paired standard error (:mod:`diag.stats.paired`); "go" needs its one-sided 95 %
  upper bound within the budget, and when val is too small to tell, the verdict says so and how
  many images would decide (:func:`drop_decision`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from diag.constants import LAMBDA_GRID, PAPER_LAMBDA2
from diag.curvature.risk import loss_model
from diag.stats.paired import images_needed, UPPER_Z
from diag.transfer.budget import BUDGET_TOL
from train.errors import DataError

# ------------------------------------------------------------------------------ loss model


def quadratic_lambda_max(risk: float, max_loss_increase: float, g_tau: float | None = 0.0) -> float:
    """Largest λ ≥ 0 with :func:`~diag.curvature.risk.loss_model` λ·gᵀτ + ½λ²R ≤ budget on all of [0, λ].

    With R > 0 it is the positive root λ_max = (−gᵀτ + sqrt((gᵀτ)² + 2·budget·R)) / R (g = 0: sqrt(2b/R));
    with R = 0, budget / gᵀτ (``inf`` when gᵀτ ≤ 0); with R < 0 the model rises to its top
    −(gᵀτ)²/(2R) at λ = −gᵀτ/R and falls after: ``inf`` when that top stays within the budget (or
    gᵀτ ≤ 0), else the smaller root.

    >>> quadratic_lambda_max(2.0, 0.01)
    0.1

    Raises:
        DataError: negative or non-finite budget, non-finite R or gᵀτ.
    """
    g = 0.0 if g_tau is None else float(g_tau)
    if not math.isfinite(max_loss_increase) or max_loss_increase < 0:
        raise DataError(f"max_loss_increase must be a finite number >= 0, got {max_loss_increase}")
    if not math.isfinite(risk) or not math.isfinite(g):
        raise DataError(f"risk and gᵀτ must be finite, got {risk} and {g}")
    b = max_loss_increase
    if risk == 0:
        return b / g if g > 0 else math.inf
    disc = g * g + 2.0 * b * risk
    if risk < 0 and (g <= 0 or disc <= 0):
        return math.inf  # concave: never above the budget (top −g²/(2R) ≤ b ⇔ disc ≤ 0)
    return (-g + math.sqrt(disc)) / risk  # R > 0: the positive root; R < 0: the smaller positive root


def grid_floor(lam_max: float, grid: Sequence[float] = LAMBDA_GRID) -> float:
    """The largest grid value ≤ ``lam_max`` (0.0: none, i.e. do not add τ*)."""
    ok = [g for g in grid if g <= lam_max + 1e-12]
    return max(ok) if ok else 0.0


def lambda2_from_predicted_drop(drop_at_ref: float, budget: float, reference: float = PAPER_LAMBDA2,
                                grid: Sequence[float] = LAMBDA_GRID, valid_up_to: float = math.inf) -> float:
    """λ2 on the grid from a predicted accuracy drop at λ2 = ``reference`` (quadratic model).

    drop(λ) = drop(ref)·(λ/ref)² is ½λ²R with R = 2·drop(ref)/ref², so λ_max = ref·sqrt(budget/drop(ref)).
    A predicted drop ≤ 0 allows the whole grid. ``valid_up_to`` caps λ2 where the loss model stops
    holding (:func:`diag.decide.loss_model.calibrate`'s ``valid_up_to``): no size is recommended
    from a model beyond the λ it was found valid at.
    """
    return grid_floor(min(quadratic_lambda_max(2.0 * drop_at_ref / reference ** 2, budget), valid_up_to), grid)


def predicted_loss_increase(risks: dict[str, float], lam: float, g_tau: float | None = None) -> dict[str, float]:
    """:func:`~diag.curvature.risk.loss_model` λ·gᵀτ + ½λ²R for every risk estimate (``risk_exact``, ...)."""
    return {name: loss_model(lam, value, g_tau) for name, value in risks.items()}


# -------------------------------------------------------------------------------- verdict


def drop_decision(drop: float, se: float, n: int, budget: float, z: float = UPPER_Z) -> tuple[str, str]:
    """Whether a measured accuracy drop is within the budget, given its paired standard error.

    ``within``: the one-sided upper bound drop + z·se ≤ budget; ``over``: the lower bound drop − z·se
    > budget; ``undecided``: the budget lies inside — val is too small to decide, and the reason
    says how many images would (:func:`diag.stats.paired.images_needed`, at the observed
    discordance rate). A drop without a finite se is ``undecided`` too.

    Returns:
        (state, reason).
    """
    if not math.isfinite(se):
        return "undecided", (f"accuracy drop {drop:.1%} measured without a standard error: its budget "
                             f"{budget:.0%} cannot be checked")
    upper, lower = drop + z * se, drop - z * se
    head = f"accuracy drop {drop:.1%} ± {se:.1%} (paired se, {n} val images; 95 % upper bound {upper:.1%})"
    if upper <= budget + BUDGET_TOL:
        return "within", f"{head} within the budget {budget:.0%}"
    if lower > budget + BUDGET_TOL:
        return "over", f"{head}: over the budget {budget:.0%} (lower bound {lower:.1%})"
    need = images_needed(drop, se, n, budget, z)
    more = (f"about {need} val images would decide at the observed discordance rate" if need is not None
            else "no number of images can be given (the drop sits at the budget)")
    return "undecided", f"{head}: val is too small to decide against the budget {budget:.0%}; {more}"


def screen_verdict(row, table: pd.DataFrame, target: str, lam: float, budget: float) -> tuple[str, list[str]]:
    """go / caution / no-go from the measured and predicted consequences of adding τ*ˢ at ``lam``.

    no-go: no λ2 within budget, a drop over twice the budget, or no predicted E-RMSE gain;
    caution: a drop over budget, a measured drop whose 95 % upper bound is not within the
    budget (:func:`drop_decision`; scaled by (λ/0.7)² with its se when ``lam`` ≠ 0.7), a
    recommended λ2 below ``lam``, or cos_ft in the bottom quarter of the known pairs; go otherwise.
    """
    reasons = []
    known = table[(table["target"] != target) & (table["source"] != target)]
    pct = float((known["cos_ft"] < row["cos_ft"]).mean() * 100) if len(known) else math.nan
    reasons.append(f"cos(τ_ftˢ, τ_ftᵀ) = {row['cos_ft']:.3f}, percentile {pct:.0f} among {len(known)} known pairs")
    risk = float(row.get("risk_exact", math.nan))
    if math.isfinite(risk):
        g_tau = row.get("grad_dot_tau", math.nan)
        g_tau = float(g_tau) if g_tau is not None and math.isfinite(float(g_tau)) else None
        grid = ", ".join(f"λ2={g:g}: {loss_model(g, risk, g_tau):.3g}" for g in (LAMBDA_GRID[0], PAPER_LAMBDA2, 1.0,
                                                                             LAMBDA_GRID[-1]))
        model = "λ2·gᵀτ + ½λ2²R" if g_tau is not None else "½λ2²R (no gᵀτ for this pair: first-order term missing)"
        reasons.append(f"R(τ*ˢ; Hᵀ) = {risk:.4g}; loss model {model}: {grid}")
    measured = float(row.get("measured_acc_drop", math.nan))
    scaled = not math.isfinite(measured) or abs(lam - PAPER_LAMBDA2) > 1e-9
    drop = measured if math.isfinite(measured) else float(row["predicted_acc_drop"])
    factor = (lam / PAPER_LAMBDA2) ** 2 if scaled else 1.0
    drop_lam = drop * factor
    src = "measured on labelled target val images" if math.isfinite(measured) else "predicted"
    note = ", scaled quadratically from λ2=0.7" if abs(lam - PAPER_LAMBDA2) > 1e-9 else ""
    reasons.append(f"accuracy drop at λ2={lam:g}: {drop_lam:.1%} ({src}{note}); budget {budget:.0%}")
    state = "within"  # a predicted drop has no paired error bar: the point value decides
    if math.isfinite(measured):
        state, text = drop_decision(drop_lam, float(row.get("measured_acc_drop_se", math.nan)) * factor,
                                    int(row.get("measured_n_val", 0) or 0), budget)
        reasons.append(text + note)
    reasons.append(f"predicted E-RMSE ÷ θ_ftᵀ's {row['predicted_ermse_norm']:.3f}, interval "
                   f"[{row['predicted_ermse_norm_lo']:.3f}, {row['predicted_ermse_norm_hi']:.3f}] (< 1: better explanations)")
    rec = float(row["lambda2"])
    reasons.append(f"largest λ2 within the budget: {rec:g}" if rec > 0 else "no λ2 of the grid stays within the budget")
    if rec <= 0 or drop_lam > 2 * budget or row["predicted_ermse_norm"] >= 1.0:
        verdict = "no-go"
    elif drop_lam > budget or state != "within" or rec + 1e-9 < lam or (math.isfinite(pct) and pct < 25):
        verdict = "caution"
    else:
        verdict = "go"
    return verdict, reasons


def method_verdict(row, budget: float) -> tuple[str, list[str]]:
    """go / caution / no-go for the source's recommended method (:mod:`diag.decide.recommend`).

    no-go: no safe recommendation, or no predicted explanation gain at it; caution: the gain's
    interval (jackknife+ over held-out targets) reaches 0, or a measured drop whose 95 % upper bound
    is not within the budget (:func:`drop_decision`: val too small to decide); go otherwise.
    """
    src = "measured on labelled target val images" if bool(row["drop_measured"]) else "predicted"
    gain, lo, hi = float(row["predicted_gain"]), float(row["predicted_gain_lo"]), float(row["predicted_gain_hi"])
    if not bool(row["safe"]):
        return "no-go", [f"no method of the tier keeps the accuracy budget (best: {row['method']} "
                         f"{row['method_param']}, drop {row['method_acc_drop']:.1%}, {src}): no safe transfer"]
    reasons = [f"recommended: {row['method']} ({row['method_param']}) at scale {row['method_scale']:.3g}: accuracy "
               f"drop {row['method_acc_drop']:.1%} ({src})",
               f"predicted explanation gain at it {gain:+.3f}, interval [{lo:+.3f}, {hi:+.3f}] (1 − E-RMSE ÷ θ_ftᵀ, "
               "scaled by the size transferred)"]
    state = "within"  # a predicted drop has no paired error bar: the point value decided ``safe``
    if bool(row["drop_measured"]):
        state, text = drop_decision(float(row["method_acc_drop"]), float(row.get("method_acc_drop_se", math.nan)),
                                    int(row.get("method_n_val", 0) or 0), budget)
        reasons.append(text)
    verdict = "no-go" if gain <= 0 else "caution" if lo <= 0 or state != "within" else "go"
    return verdict, reasons
