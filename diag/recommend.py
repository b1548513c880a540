"""Per source, the transfer method and scale to deploy within an accuracy budget, by data-access tier (issue 10).

What each tier allows (never the target's explanations, never its ``test`` split):

* tier 0 (θ_ftᵀ only): plain eq. 8; λ2 from the predicted accuracy drop at λ2 = 0.7 scaled by
  the quadratic model (drop ∝ ½λ²R, :func:`diag.decide.lambda2_from_predicted_drop`);
* tier 1 (+ the target's Hessian card): also ``precondition`` (the card's diagonal) and
  ``project`` (its top-k eigenvectors); each candidate's drop is the predicted drop at λ2 = 0.7
  times the ratio of its predicted loss increase to plain eq. 8's at 0.7 (the same quadratic
  model, with R from the card);
* tier 2 (+ labelled target images): also ``blocks``; every candidate is measured on the
  target's ``val`` split (:func:`diag.repair_select.select_repair`; plain eq. 8 from the
  λ2 grid already measured, :func:`diag.decide.accuracy_grid`).

Among the safe candidates of every allowed method (drop within budget, and for measured grids
every smaller candidate too) the recommendation is the one transferring the largest size
⟨Δ, τ⟩/‖τ‖ (:class:`diag.repair_select.Candidate`); ``size_ratio`` is that size over plain eq. 8's
at λ2 = 0.7, 0.7‖τ‖. The universal mix is per target, not per source: it is scored by
``diag transfer --method mix`` and the study, not ranked here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from diag.constants import PAPER_LAMBDA1, PAPER_LAMBDA2
from diag.decide import lambda2_from_predicted_drop
from train.errors import unknown

#: Methods each tier may recommend.
TIER_METHODS = {0: ("plain",), 1: ("plain", "precondition", "project"),
                2: ("plain", "project", "precondition", "blocks")}
#: What a recommendation row adds to a ranking.
COLUMNS = ("method", "method_param", "method_scale", "size_ratio", "method_acc_drop", "drop_measured", "safe")


def tier_methods(tier: int, methods: Sequence[str] | None = None) -> tuple[str, ...]:
    """The methods of ``tier`` (restricted to ``methods`` when given; ``plain`` always stays)."""
    allowed = TIER_METHODS[int(tier)]
    if methods is None:
        return allowed
    for m in methods:
        if m not in TIER_METHODS[2] + ("mix",):
            raise unknown("recommendation method", m, TIER_METHODS[2])
    return tuple(m for m in allowed if m in methods or m == "plain")


def _row(method, param, scale, size_ratio, drop, measured, safe) -> dict:
    return dict(zip(COLUMNS, (method, str(param), float(scale), float(size_ratio), float(drop), bool(measured),
                              bool(safe))))


def _best(rows: list[dict]) -> dict:
    """The safe row of largest size (ties: the earlier method); else plain's (unsafe, 'no safe transfer')."""
    safe = [r for r in rows if r["safe"]]
    return max(safe, key=lambda r: r["size_ratio"]) if safe else rows[0]


def recommend_predicted(source: str, predicted_drop: float, budget: float, tau_norm: float,
                        curvature=None, tau=None, methods: Sequence[str] = ("plain",)) -> dict:
    """Tier 0 / 1: the recommendation from the predicted drop at λ2 = 0.7 (no target image read).

    Args:
        source: the source (for messages only).
        predicted_drop: predicted relative accuracy drop of plain eq. 8 at λ2 = 0.7.
        budget: accuracy-drop budget.
        tau_norm: ‖τ*ˢ‖.
        curvature: the target's card (tier 1; :class:`diag.repair_select.RepairCurvature` or a card).
        tau: τ*ˢ (tier 1).
        methods: methods allowed besides plain (tier 1: ``precondition``, ``project``).
    """
    lam = lambda2_from_predicted_drop(predicted_drop, budget)
    rows = [_row("plain", lam, lam, lam / PAPER_LAMBDA2, predicted_drop * (lam / PAPER_LAMBDA2) ** 2, False, lam > 0)]
    curved = [m for m in methods if m != "plain"]
    if curvature is None or tau is None or not curved:
        return _best(rows)
    from diag.repair_select import RepairCurvature, candidates

    curv = RepairCurvature.of(curvature)
    ref = candidates("plain", tau, curv, grid=(PAPER_LAMBDA2,))[0].predicted_loss_increase
    for m in curved:
        if m == "project" and (curv.card is None or curv.card.k == 0):
            continue
        for c in candidates(m, tau, curv, PAPER_LAMBDA2):
            drop = predicted_drop * c.predicted_loss_increase / ref if ref > 0 else predicted_drop
            rows.append(_row(m, c.param, c.scale, c.size / (PAPER_LAMBDA2 * tau_norm), drop, False,
                             drop <= budget + 1e-9))
    return _best(rows)


def plain_from_grid(grid: pd.DataFrame, budget: float) -> dict:
    """Tier 2, plain eq. 8: the largest λ2 of the measured val grid such that it and every smaller λ2 keep the budget."""
    g = grid.sort_values("lambda2")
    safe = (g["acc_drop"] <= budget + 1e-9).astype(int).cummin().astype(bool)
    if not safe.any():
        first = g.iloc[0]
        return _row("plain", first["lambda2"], first["lambda2"], first["lambda2"] / PAPER_LAMBDA2,
                    first["acc_drop"], True, False)
    best = g[safe].iloc[-1]
    return _row("plain", best["lambda2"], best["lambda2"], best["lambda2"] / PAPER_LAMBDA2, best["acc_drop"], True,
                True)


def recommend_measured(ws, target: str, source: str, grid: pd.DataFrame, budget: float, curvature,
                       methods: Sequence[str], lambda1: float = PAPER_LAMBDA1) -> dict:
    """Tier 2: every allowed method chosen on the target's ``val`` split, the largest safe size kept."""
    from diag.repair_select import select_repair

    tau = ws.vector(source, "star")
    rows = [plain_from_grid(grid, budget)]
    norm = tau.norm()
    for m in (m for m in methods if m != "plain"):
        choice = select_repair(ws, target, tau, m, curvature, lambda1, PAPER_LAMBDA2, max_acc_drop=budget)
        c = choice.candidate
        drop = 1.0 - choice.val_accuracy / max(choice.val_accuracy_ft_target, 1e-12)
        rows.append(_row(m, c.param, c.scale, c.size / (PAPER_LAMBDA2 * norm) if norm > 0 else 0.0, drop, True,
                         choice.safe))
    return _best(rows)


def predicted_gain(ermse_norm: float, size_ratio: float, residual_sd: float, safe: bool) -> tuple[float, float]:
    """(gain, sd) of the explanation at a recommendation: (1 − predicted E-RMSE ÷ θ_ftᵀ at λ2 = 0.7)·size_ratio.

    The predictor is fitted on eq. 8 at λ2 = 0.7; the gain is taken linear in the size transferred
    along τ*ˢ (first order in the added vector), and so is the band: the predictor's residual sd
    times the same ratio. An unsafe recommendation transfers nothing: (0, 0).
    """
    if not safe or not math.isfinite(ermse_norm):
        return 0.0, 0.0
    return (1.0 - ermse_norm) * size_ratio, residual_sd * size_ratio
