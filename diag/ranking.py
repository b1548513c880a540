"""Choosing an explainability vector for a target, by data-access tier, and the pre-deployment screen.

Tiers (what the target owner gives us):

* tier 0 — weights only: θ_ftᵀ (the prediction-only model), hence cos(τ_ftˢ, τ_ftᵀ) globally
  and per block, and norms;
* tier 1 — a published Hessian card of the target: adds card-R and diag-R;
* tier 2 — target images with labels (never target explanations): adds exact R and a quick
  labelled accuracy check of the transferred model over a λ2 grid.

A predictor fitted on known pairs of the suite (never pairs that involve the target,
neither as target nor as source) turns the diagnostics into predicted E-RMSE and accuracy
change; :func:`evaluate_rankers` measures it leave-one-target-out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from diag.diagnostics import Diagnostics
from diag.predictor import evaluate_loto, fit_predictor, fit_source_model, tier_features
from diag.transfer import transferred_state
from train.errors import DataError

LAMBDA_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
TIER_NAMES = {0: "tier 0 (weights only)", 1: "tier 1 (published Hessian card)", 2: "tier 2 (labelled target images)"}


@dataclass
class SourceRanking:
    """Ranked candidate sources for one target."""

    target: str
    tier: int
    max_acc_drop: float
    rows: pd.DataFrame
    n_training_pairs: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def val(v):
            return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)

        sources = []
        for _, r in self.rows.iterrows():
            sources.append({
                "source": r["source"], "rank": int(r["rank"]), "cos_ft": val(r.get("cos_ft")),
                "risk_diag": val(r.get("risk_diag")) if self.tier >= 1 else None,
                "risk_card": val(r.get("risk_card")) if self.tier >= 1 else None,
                "risk_exact": val(r.get("risk_exact")) if self.tier >= 2 else None,
                "predicted_ermse": val(r.get("predicted_ermse")),
                "predicted_ermse_norm": val(r.get("predicted_ermse_norm")),
                "predicted_acc_drop": val(r.get("predicted_acc_drop")),
                "measured_acc_drop": val(r.get("measured_acc_drop")),
                "lambda2": val(r.get("lambda2")),
            })
        return {"target": self.target, "tier": self.tier, "tier_name": TIER_NAMES[self.tier],
                "max_acc_drop": self.max_acc_drop, "n_training_pairs": self.n_training_pairs,
                "sources": sources, "notes": self.notes}

    def table(self) -> str:
        lines = [f"Sources for target '{self.target}' — {TIER_NAMES[self.tier]}; predictor fitted on "
                 f"{self.n_training_pairs} known pairs without '{self.target}'; budget: accuracy drop ≤ "
                 f"{self.max_acc_drop:.0%} of θ_ftᵀ", ""]
        head = f"{'rank':>4s}  {'source':12s} {'cos_ft':>7s} {'R_card':>9s} {'R_diag':>9s} {'R_exact':>9s} " \
               f"{'pred E-RMSE':>11s} {'pred Δacc':>9s} {'λ2':>5s}"
        lines += [head, "-" * len(head)]

        def fmt(v, w, p=3):
            return f"{'—':>{w}s}" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{w}.{p}g}"

        for s in self.to_dict()["sources"]:
            lines.append(f"{s['rank']:4d}  {s['source']:12s} {fmt(s['cos_ft'], 7)} {fmt(s['risk_card'], 9)} "
                         f"{fmt(s['risk_diag'], 9)} {fmt(s['risk_exact'], 9)} {fmt(s['predicted_ermse'], 11)} "
                         f"{fmt(-s['predicted_acc_drop'] if s['predicted_acc_drop'] is not None else None, 9, 2)} "
                         f"{fmt(s['lambda2'], 5, 2)}")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _source_quality(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("ermse_star_source", "accuracy_ft_source") if c in table.columns]
    return table.groupby("source")[cols].mean() if cols else pd.DataFrame()


def training_pairs(table: pd.DataFrame, target: str) -> pd.DataFrame:
    """Known pairs usable to rank sources for ``target``: none that involve the target."""
    return table[(table["target"] != target) & (table["source"] != target)].copy()


def candidate_rows(diag: Diagnostics, table: pd.DataFrame, target: str, sources: list[str], tier: int) -> pd.DataFrame:
    """Diagnostics of every (source, target) candidate at the given tier."""
    quality = _source_quality(table)
    rows = []
    for source in sources:
        row = {"source": source, "target": target}
        row.update(diag.cosines(source, target))
        row.pop("cos_star", None)  # needs the target's explanations: never a ranking input
        if tier >= 1:
            row.update(diag.risks(source, target, exact=tier >= 2))
        if source in quality.index:
            row.update(quality.loc[source].to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def rank_for_target(diag: Diagnostics, table: pd.DataFrame, target: str, sources: list[str], tier: int,
                    max_acc_drop: float = 0.05, model: str = "ridge", accuracy_check: bool | None = None,
                    lambda1: float = 1.0) -> SourceRanking:
    """Rank candidate sources for ``target`` with a predictor fitted on pairs without it."""
    if not sources:
        raise DataError(f"No candidate source vectors for target '{target}'")
    train = training_pairs(table, target)
    if len(train) < 4:
        raise DataError(f"Only {len(train)} known pairs without '{target}'; need at least 4 to fit a predictor")
    cands = candidate_rows(diag, table, target, sources, tier)
    if tier >= 2 and "accuracy_ft_target" in train.columns:
        cands["accuracy_ft_target"] = np.nan  # filled by the accuracy check below
    features = [f for f in tier_features(train, tier) if f in cands.columns]
    notes = [f"features: {', '.join(features)}"]
    check = tier >= 2 if accuracy_check is None else accuracy_check
    grid = None
    if check:
        grid = accuracy_grid(diag, target, sources, lambda1)
        cands["accuracy_ft_target"] = grid.attrs["accuracy_ft_target"]
        features = [f for f in tier_features(train, tier) if f in cands.columns]
    source_model = fit_source_model(train, features, model=model)
    absolute = fit_predictor(train, features, target="ermse", model=model, name=f"{model} ermse")
    pred = source_model.predict(cands)
    cands = pd.concat([cands.reset_index(drop=True), pred.reset_index(drop=True)], axis=1)
    cands["predicted_ermse"] = absolute.predict(cands)
    cands = cands.sort_values("predicted_ermse_norm", kind="stable").reset_index(drop=True)
    cands.insert(0, "rank", np.arange(1, len(cands) + 1))
    # recommended λ2 within the accuracy budget
    lam, measured = [], []
    for _, r in cands.iterrows():
        if grid is not None:
            g = grid[grid["source"] == r["source"]]
            ok = g[g["acc_drop"] <= max_acc_drop]
            lam.append(float(ok["lambda2"].max()) if len(ok) else 0.0)
            at07 = g[np.isclose(g["lambda2"], 0.7)]
            measured.append(float(at07["acc_drop"].iloc[0]) if len(at07) else math.nan)
        else:
            lam.append(quadratic_lambda(r["predicted_acc_drop"], max_acc_drop))
            measured.append(math.nan)
    cands["lambda2"] = lam
    cands["measured_acc_drop"] = measured
    if grid is not None:
        notes.append("λ2: largest grid value whose measured accuracy drop on labelled target images is within budget")
    else:
        notes.append("λ2: from the predicted drop at λ2 = 0.7 scaled by the quadratic model (drop ∝ λ2²)")
    notes.append("E-RMSE is per patch; unrelated z-scored maps score √2 ≈ 1.414")
    return SourceRanking(target, tier, max_acc_drop, cands, len(train), notes)


def quadratic_lambda(predicted_drop_at_07: float, budget: float, reference: float = 0.7) -> float:
    """Largest λ2 with drop(λ2) = drop(0.7)·(λ2/0.7)² ≤ budget, on the paper's grid (0 if none)."""
    if not math.isfinite(predicted_drop_at_07) or predicted_drop_at_07 <= 0:
        return max(LAMBDA_GRID)
    lam_max = reference * math.sqrt(budget / predicted_drop_at_07)
    ok = [l for l in LAMBDA_GRID if l <= lam_max + 1e-12]
    return max(ok) if ok else 0.0


def labelled_target(diag: Diagnostics, target: str, n_images: int = 400):
    """Labelled target test images (no explanations needed): model inputs and labels."""
    from train.datasets import model_inputs

    return model_inputs(diag.backbone.config, target, "test", n_images, diag.data.get(target))


def _accuracy(diag: Diagnostics, target: str, state, x, y, batch: int = 256) -> float:
    import torch

    model = diag.store.model(target, state, backbone=diag.backbone)
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / max(len(y), 1)


def accuracy_grid(diag: Diagnostics, target: str, sources: list[str], lambda1: float = 1.0,
                  grid=LAMBDA_GRID) -> pd.DataFrame:
    """Measured target accuracy of eq. 8 over a λ2 grid (labelled target images, tier 2; no φ needed)."""
    x, y = labelled_target(diag, target)
    ft_t = diag.vector(target, "ft")
    base_acc = _accuracy(diag, target, ft_t.apply_to(diag.base, base_hash=diag.base_hash), x, y)
    rows = []
    for source in sources:
        star = diag.vector(source, "star")
        for lam in grid:
            state = transferred_state(diag.base, ft_t, star, lambda1, lam, diag.base_hash)
            acc = _accuracy(diag, target, state, x, y)
            rows.append({"source": source, "lambda2": lam, "accuracy": acc,
                         "acc_drop": 1.0 - acc / max(base_acc, 1e-12)})
    out = pd.DataFrame(rows)
    out.attrs["accuracy_ft_target"] = base_acc
    return out


def evaluate_rankers(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Leave-one-target-out evaluation of the tier predictors, the paper's cos(τ_ft) proxy and random."""
    out = []
    seen = set()
    for tier in (0, 1, 2):
        feats = tier_features(table, tier)
        if not feats or tuple(feats) in seen:
            continue
        seen.add(tuple(feats))
        for ev in evaluate_loto(table, feats, target="ermse", n_boot=n_boot, seed=seed):
            d = {"name": ev.name if ev.name in ("cos_ft proxy", "random", "proxy") or "proxy" in ev.name
                 or ev.name == "random" else f"{ev.name} (tier {tier})",
                 "tier": tier, "mean_spearman": ev.mean_spearman, "ci95": list(ev.ci95),
                 "mean_top1_regret": ev.mean_top1_regret, "random_top1_regret": ev.random_top1_regret,
                 "pooled_r": getattr(ev, "pooled_r", None), "pooled_ci95": list(getattr(ev, "pooled_ci95", []) or [])}
            if d["name"] in {o["name"] for o in out}:
                continue
            out.append(d)
    return out
