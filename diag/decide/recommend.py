"""Per source, the transfer method and scale to deploy within an accuracy budget, by data-access tier.

What each tier allows (never the target's explanations, never its ``test`` split):

* tier 0 (θ_ftᵀ only): plain eq. 8; λ2 from the predicted accuracy drop at λ2 = 0.7 scaled by
  the quadratic model (drop ∝ ½λ²R, :func:`diag.decide.rules.lambda2_from_predicted_drop`);
* tier 1 (+ the target's Hessian card): also ``precondition`` (the card's diagonal) and
  ``project`` (its top-k eigenvectors); each candidate's drop is the predicted drop at λ2 = 0.7
  times the ratio of its predicted loss increase to plain eq. 8's at 0.7 (the same quadratic
  model, with R from the card);
* tier 2 (+ labelled target images): also ``blocks``; every candidate is measured on the
  target's ``val`` split (:func:`diag.transfer.select.select_repair`; plain eq. 8 from the
  λ2 grid already measured, :func:`diag.decide.rules.accuracy_grid`).

Among the safe candidates of every allowed method (drop within budget, and for measured grids
every smaller candidate too) the recommendation is the one transferring the largest size
⟨Δ, τ⟩/‖τ‖ (:class:`diag.transfer.select.Candidate`); ``size_ratio`` is that size over plain eq. 8's
at λ2 = 0.7, 0.7‖τ‖.

Beside the sources, :func:`recommend_mixes` lists the multi-source candidates of the target —
the universal vector (uniform over the sources) and the mix weighted by the ranker's predicted
gain (:func:`~diag.transfer.mixing.mix_weights`) — each with its λ2 within the budget, so that a user sees whether a
mix beats the top single source (the study's measured comparison: :mod:`diag.study.methods_report` (c)).

The interval of every predicted gain (:func:`predicted_gain`) is the E-RMSE ratio's interval
(jackknife+ over held-out targets, :class:`diag.decide.predictor.QuantityModel`) mapped through
the gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from diag.constants import PAPER_LAMBDA1, PAPER_LAMBDA2
from diag.decide.predictor import FEATURE_FREE_MODELS, RANKER, fit_quantity, tier_features
from diag.decide.record import MIN_TRAINING_PAIRS, distinct_pairs, training_pairs
from diag.decide.rules import lambda2_from_predicted_drop
from diag.transfer.budget import recommend_lambda2
from diag.table import load_study, select_run, table_files
from diag.transfer import mixing
from diag.transfer.methods import TIERS, RepairCurvature, candidates, tier_methods_of
from diag.transfer.select import select_repair
from train.errors import ArtifactError, DataError, unknown

#: Methods each tier may recommend (from the registry, :mod:`diag.transfer.methods`).
TIER_METHODS = {tier: tier_methods_of(tier) for tier in TIERS}
#: What a recommendation row adds to a ranking.
COLUMNS = ("method", "method_param", "method_scale", "size_ratio", "method_acc_drop", "drop_measured", "safe",
           "method_acc_drop_se", "method_n_val")


def tier_methods(tier: int, methods: Sequence[str] | None = None) -> tuple[str, ...]:
    """The methods of ``tier`` (restricted to ``methods`` when given; ``plain`` always stays).

    ``mix`` is accepted in ``methods`` and dropped: the mixes are listed apart (:func:`recommend_mixes`).

    Raises:
        UnknownNameError: a tier outside :data:`TIER_METHODS`, or an unknown method.
    """
    if tier not in TIER_METHODS:
        raise unknown("tier", str(tier), [str(t) for t in TIER_METHODS])
    allowed = TIER_METHODS[tier]
    if methods is None:
        return allowed
    for m in methods:
        if m not in TIER_METHODS[max(TIERS)] + ("mix",):
            raise unknown("recommendation method", m, TIER_METHODS[max(TIERS)] + ("mix",))
    return tuple(m for m in allowed if m in methods or m == "plain")


def _row(method, param, scale, size_ratio, drop, measured, safe, drop_se=math.nan, n_val=0) -> dict:
    """A recommendation row; a measured drop carries its paired standard error over ``n_val`` val images."""
    return dict(zip(COLUMNS, (method, str(param), float(scale), float(size_ratio), float(drop), bool(measured),
                              bool(safe), float(drop_se), int(n_val))))


def _best(rows: list[dict]) -> dict:
    """The safe row of largest size (ties: the earlier method); else plain's (unsafe, 'no safe transfer')."""
    safe = [r for r in rows if r["safe"]]
    return max(safe, key=lambda r: r["size_ratio"]) if safe else rows[0]


def recommend_predicted(predicted_drop: float, budget: float, tau_norm: float,
                        curvature=None, tau=None, methods: Sequence[str] = ("plain",)) -> dict:
    """Tier 0 / 1: the recommendation from the predicted drop at λ2 = 0.7 (no target image read).

    Args:
        predicted_drop: predicted relative accuracy drop of plain eq. 8 at λ2 = 0.7.
        budget: accuracy-drop budget.
        tau_norm: ‖τ*ˢ‖.
        curvature: the target's card (tier 1; :class:`diag.transfer.select.RepairCurvature` or a card).
        tau: τ*ˢ (tier 1).
        methods: methods allowed (``plain`` is always tried; tier 1 adds ``precondition``, ``project``).

    Returns:
        The chosen row (:data:`COLUMNS`): the safe candidate of largest ``size_ratio``, else plain
        eq. 8's (unsafe). A method's drop is ``predicted_drop`` times its predicted loss increase
        over plain eq. 8's at λ2 = 0.7 (plain's own: ``predicted_drop`` · (λ2/0.7)²).
    """
    lam = lambda2_from_predicted_drop(predicted_drop, budget)
    rows = [_row("plain", lam, lam, lam / PAPER_LAMBDA2, predicted_drop * (lam / PAPER_LAMBDA2) ** 2, False, lam > 0)]
    curved = [m for m in methods if m != "plain"]
    if curvature is None or tau is None or not curved:
        return _best(rows)

    curv = RepairCurvature.of(curvature)
    ref = candidates("plain", tau, curv, grid=(PAPER_LAMBDA2,))[0].predicted_loss_increase
    for m in curved:
        if m == "project" and (curv.eig is None or curv.eig.k == 0):
            continue
        for c in candidates(m, tau, curv, PAPER_LAMBDA2):
            drop = predicted_drop * c.predicted_loss_increase / ref if ref > 0 else predicted_drop
            rows.append(_row(m, c.param, c.scale, c.size / (PAPER_LAMBDA2 * tau_norm) if tau_norm > 0 else 0.0,
                             drop, False, drop <= budget + 1e-9))
    return _best(rows)


def plain_from_grid(grid: pd.DataFrame, budget: float) -> dict:
    """Tier 2, plain eq. 8: the λ2 of :func:`diag.transfer.budget.recommend_lambda2` on the measured val grid.

    When no λ2 is safe, the smallest λ2 of the grid is reported as unsafe (``safe`` False).
    """
    cols = [c for c in ("acc_drop", "acc_drop_se", "n_val") if c in grid]
    per = grid.groupby("lambda2", as_index=False)[cols].mean().sort_values("lambda2")
    lam = recommend_lambda2(grid, budget)
    safe = lam > 0
    row = per[per["lambda2"] == lam].iloc[0] if safe else per.iloc[0]
    return _row("plain", row["lambda2"], row["lambda2"], row["lambda2"] / PAPER_LAMBDA2, row["acc_drop"], True, safe,
                row.get("acc_drop_se", math.nan), row.get("n_val", 0))


def recommend_measured(ws, target: str, source: str, grid: pd.DataFrame, budget: float, curvature,
                       methods: Sequence[str], lambda1: float = PAPER_LAMBDA1) -> dict:
    """Tier 2: every allowed method chosen on the target's ``val`` split, the largest safe size kept."""
    tau = ws.vector(source, "star")
    rows = [plain_from_grid(grid, budget)]
    norm = tau.norm()
    for m in (m for m in methods if m != "plain"):
        choice = select_repair(ws, target, tau, m, curvature, lambda1, PAPER_LAMBDA2, max_acc_drop=budget)
        c = choice.candidate
        drop = 1.0 - choice.val_accuracy / max(choice.val_accuracy_ft_target, 1e-12)
        rows.append(_row(m, c.param, c.scale, c.size / (PAPER_LAMBDA2 * norm) if norm > 0 else 0.0, drop, True,
                         choice.safe, choice.val_acc_drop_se, choice.n_val))
    return _best(rows)


def predicted_gain(ermse_norm: float, lo: float, hi: float, size_ratio: float,
                   safe: bool) -> tuple[float, float, float]:
    """(gain, lo, hi) of the explanation at a recommendation: g = (1 − predicted E-RMSE ÷ θ_ftᵀ at λ2 = 0.7)·size_ratio.

    The predictor is fitted on eq. 8 at λ2 = 0.7; the gain is taken linear in the size transferred
    along τ*ˢ (first order in the added vector). g is decreasing in the ratio, so the ratio's
    interval [lo, hi] (:class:`diag.decide.predictor.QuantityModel`: jackknife+ over held-out
    targets) maps to [(1 − hi)·size_ratio, (1 − lo)·size_ratio], with the ratio's coverage when the
    gain is linear in the size. An unsafe recommendation (or none of size 0) transfers nothing: (0, 0, 0).
    """
    if not safe or size_ratio <= 0 or not math.isfinite(ermse_norm):
        return 0.0, 0.0, 0.0
    return (1.0 - ermse_norm) * size_ratio, (1.0 - hi) * size_ratio, (1.0 - lo) * size_ratio


# --------------------------------------------------------------- the ranker's gains and mixes


def ranker_gains(plain: pd.DataFrame, target: str, tier: int = 0, model: str = RANKER,
                 known: pd.DataFrame | None = None) -> tuple[dict, str]:
    """({source: predicted E-RMSE gain for ``target``}, how) from the plain eq. 8 rows of one run at one λ2.

    The ranker is the predictor of normalised E-RMSE (E-RMSE ÷ θ_ftᵀ's) that ``rank-sources`` ranks
    with (:data:`diag.decide.predictor.RANKER` by default: each source's record on the known pairs;
    ``ridge`` / ``gbr`` on the tier's features, :func:`diag.decide.predictor.tier_features`), the
    ranking's own fit (:func:`diag.decide.predictor.fit_quantity`: the training mean where it does
    not beat it out of sample, which ``how`` then names), fitted only on pairs that involve the
    target neither as target nor as source (:func:`diag.decide.record.training_pairs`) — of ``known``
    when given (e.g. the pairs of every training seed), else of ``plain``. The rows
    (s, target) are read for their features only — never their outcomes (E-RMSE, accuracy: the
    target's test split) — so the gains are what a target owner without explanations could compute.
    The gain is gₛ = 1 − predicted E-RMSE ÷ θ_ftᵀ (> 0: the source is predicted to lower the target's
    E-RMSE). With fewer than :data:`MIN_TRAINING_PAIRS` distinct training pairs (or, for a feature predictor,
    no usable feature) the paper's proxy stands in, gₛ = cos(τ_ftˢ, τ_ftᵀ) (a score in the same
    direction, not an E-RMSE gain).

    Raises:
        DataError: no candidate row (s, target), or no ``cos_ft`` column for the proxy.
    """

    cands = plain[(plain["target"] == target) & (plain["source"] != target)]
    if cands.empty:
        raise DataError(f"no known pair (source, '{target}') to rank sources for '{target}'")
    train = training_pairs(plain if known is None else known, target)
    feature_free = model in FEATURE_FREE_MODELS
    feats = [f for f in tier_features(train, tier) if f in cands.columns] if not feature_free else []
    if distinct_pairs(train) >= MIN_TRAINING_PAIRS and (feats or feature_free):
        fit = fit_quantity(train, feats, "ermse_norm", model)
        pred = fit.full.predict(cands)
        how = model if feature_free else f"{model} (tier {tier})"
        if fit.full.model != model:
            how += " → training mean (no out-of-sample skill)"
        return dict(zip(cands["source"].astype(str), (1.0 - pred).tolist())), how
    if "cos_ft" not in cands.columns:
        raise DataError("the ranker's proxy needs the 'cos_ft' column of the study table")
    return dict(zip(cands["source"].astype(str), cands["cos_ft"].astype(float).tolist())), "cos_ft proxy"


def study_gains(folder, target: str, seed: int | None = None, variant: str | None = None,
                lambda2: float = PAPER_LAMBDA2) -> tuple[dict, str]:
    """:func:`ranker_gains` for ``target`` from one run (variant, training seed) of a study folder's plain rows,
    the ranker fitted on the pairs of every training seed the folder holds (as the study's ranked pass does).

    Raises:
        ArtifactError: no study table in ``folder`` (run ``diag study`` over the suite first).
    """

    path = Path(folder)
    if not path.is_dir() or not table_files(path):
        raise ArtifactError(f"mix-ranked needs a study of known pairs in {path} (run `diag study` over the suite "
                            "first, or pass --study)")
    study = load_study(path, lambda2=lambda2)
    return ranker_gains(select_run(study, variant, seed), target, known=select_run(study, variant, "all"))


def recommend_mixes(ws, target: str, cands: pd.DataFrame, budget: float, measured: bool, curvature,
                    lambda1: float = PAPER_LAMBDA1) -> pd.DataFrame:
    """The multi-source candidates of a ranking: the universal and the ranker-weighted mix, each with its λ2.

    Weights: uniform over ``cands``' sources, and :func:`~diag.transfer.mixing.mix_weights` of the ranking's own gains
    gₛ = 1 − predicted E-RMSE ÷ θ_ftᵀ (its predictor never saw the target's pairs). λ2 within the
    budget: tier 2 (``measured``) by :func:`diag.transfer.select.select_repair` on the target's
    ``val`` split over the λ2 grid; tier 1 by the quadratic model with the card's R, the drop per
    unit predicted loss increase taken as the median over the sources of predicted drop ÷ ½·0.7²·R(τ*ˢ);
    tier 0 has no bound on a mix's drop (no curvature, no images): not recommended.
    The predicted gain is first order in the added vector, Σₛ wₛgₛ · λ2/0.7 (so a mix gains over
    the top source only by allowing a larger λ2); its interval takes Σₛ wₛ·lo and Σₛ wₛ·hi of the
    sources' E-RMSE ratio intervals (exact when the sources' errors on one target move together,
    wider otherwise; a mix is not what the predictor was fitted on, so it has no coverage guarantee).
    Long because the three tiers' λ2 rules sit side by side, so they read as one decision.

    Returns:
        One row per mix (``universal``, ``ranked``): ``candidate``, ``method`` (``mix`` or
        ``mix-ranked``), ``weights`` (text), the :data:`COLUMNS` (``method_param``: the mix's name, or
        why it has no λ2) and ``predicted_gain``, ``predicted_gain_lo``, ``predicted_gain_hi``.
    """

    sources = [str(s) for s in cands["source"]]
    gains = dict(zip(sources, (1.0 - cands["predicted_ermse_norm"].astype(float)).tolist()))
    bounds = {s: (float(lo), float(hi)) for s, lo, hi in
              zip(sources, cands["predicted_ermse_norm_lo"], cands["predicted_ermse_norm_hi"])}
    vectors = {s: ws.vector(s, "star") for s in sources}
    weightings = {"universal": ("mix", {s: 1.0 / len(sources) for s in sources}),
                  "ranked": ("mix-ranked", mixing.mix_weights(gains, target))}
    curv = RepairCurvature.of(curvature) if curvature is not None and not measured else None
    per_unit = math.nan
    if curv is not None:
        ref = [candidates("plain", vectors[s], curv, grid=(PAPER_LAMBDA2,))[0].predicted_loss_increase for s in sources]
        ratios = [d / r for d, r in zip(cands["predicted_acc_drop"].astype(float), ref) if r > 0]
        per_unit = float(pd.Series(ratios).median()) if ratios else math.nan
    rows = []
    for name, (method, w) in weightings.items():
        row = {"candidate": f"{name} mix", "method": method, "weights": ", ".join(f"{s}:{v:.3g}" for s, v in w.items())}
        if not w:
            rows.append({**row, **_row(method, "no positive predicted gain", 0.0, 0.0, math.nan, False, False),
                         "predicted_gain": 0.0, "predicted_gain_lo": 0.0, "predicted_gain_hi": 0.0})
            continue
        vec, param = mixing.mix(vectors, w, target), name
        if measured:
            choice = select_repair(ws, target, vec, "mix", curvature, lambda1, mixes={name: vec}, max_acc_drop=budget)
            lam, safe = choice.candidate.scale, choice.safe
            drop = 1.0 - choice.val_accuracy / max(choice.val_accuracy_ft_target, 1e-12)
            drop_se, n_val = choice.val_acc_drop_se, choice.n_val
        elif curv is not None and math.isfinite(per_unit):
            drop07 = per_unit * candidates("plain", vec, curv, grid=(PAPER_LAMBDA2,))[0].predicted_loss_increase
            lam = lambda2_from_predicted_drop(drop07, budget)
            safe, drop = lam > 0, drop07 * (lam / PAPER_LAMBDA2) ** 2
        else:
            lam, safe, drop = 0.0, False, math.nan
            param = "no bound on its drop without a card or val images"
        if not measured:
            drop_se, n_val = math.nan, 0
        used = [s for s in w if w[s] > 0]  # a zero weight never turns a NaN gain (or an infinite bound) into NaN
        g = sum(w[s] * gains[s] for s in used)
        lo, hi = (sum(w[s] * bounds[s][i] for s in used) for i in (0, 1))
        gain, gain_lo, gain_hi = predicted_gain(1.0 - g, lo, hi, lam / PAPER_LAMBDA2, safe)
        rows.append({**row, **_row(method, param, lam, lam / PAPER_LAMBDA2, drop, measured, safe, drop_se, n_val),
                     "predicted_gain": gain, "predicted_gain_lo": gain_lo, "predicted_gain_hi": gain_hi})
    return pd.DataFrame(rows)
