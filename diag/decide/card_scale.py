"""The card's risk calibrated on the suite's known pairs: one scale, fitted without the target.

A card's risk is biased low: the diagonal Σ diag(Hᵀ)_i τ_i² misses every off-diagonal coupling
and the top-k eigenpairs cover little of τ*ˢ, so on the mini-suite R_diag is ~20× and the
eigenpairs + residual diagonal ~4× below the exact τᵀHᵀτ. The bias is steady across pairs
(R_diag's Spearman with R_exact is ≈ 0.97), so one multiplicative scale fitted on known pairs
makes the card faithful in level as well as in rank:

    R_cal(τ) = c · R_column(τ),   c = median over the known pairs of R_exact ÷ R_column,

with the known pairs those of :func:`diag.decide.predictor.training_pairs` (the target neither
as target nor as source, as every prediction for a new target is fitted). :func:`fit_card_scale`
also says how well it held, leave one target out over the known pairs: the share within ×1.5 of
R_exact and the spread of the log ratio. The scale belongs to a backbone and its curvature
settings — fitted on a suite of the same backbone, it is not carried to another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diag.decide.loss_model import WITHIN
from diag.decide.predictor import training_pairs

__all__ = ["CARD_COLUMNS", "CardScale", "calibrated_card_risk", "fit_card_scale"]

#: Card risks a scale can be fitted for, best first on the mini-suite (leave-one-target-out share within ×1.5).
CARD_COLUMNS = ("risk_diag", "risk_card")
#: Fewer known pairs than this: no scale.
MIN_PAIRS = 6


@dataclass(frozen=True)
class CardScale:
    """R_exact ≈ ``scale`` · R_``column`` on the known pairs.

    Attributes:
        column: the card risk scaled (``risk_diag`` or ``risk_card``).
        scale: median of R_exact ÷ R_column over the known pairs.
        n_pairs, n_targets: known pairs (rows: a pair of one seed is one row) and their targets.
        loto_within: share of the known pairs within ×1.5 of R_exact when each target's scale is fitted
            without it (NaN below 2 targets).
        log_sd: sd of log(R_exact ÷ R_column) over the known pairs (the scale's spread).
    """

    column: str
    scale: float
    n_pairs: int
    n_targets: int
    loto_within: float
    log_sd: float

    def apply(self, value: float) -> float:
        return self.scale * float(value)

    def note(self) -> str:
        held = "" if math.isnan(self.loto_within) else (
            f"; leaving each target out, {self.loto_within:.0%} of the known pairs fall within ×{WITHIN:g} of R_exact")
        return (f"card risk calibrated: R_cal = {self.scale:.3g} × {self.column} (median R_exact ÷ {self.column} over "
                f"{self.n_pairs} known pairs of {self.n_targets} targets, log-ratio sd {self.log_sd:.2f}{held})")

    def to_dict(self) -> dict:
        return {"column": self.column, "scale": self.scale, "n_pairs": self.n_pairs, "n_targets": self.n_targets,
                "loto_within": self.loto_within, "log_sd": self.log_sd}


def _ratios(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows with a positive, finite R_exact and R_column: target and log(R_exact ÷ R_column)."""
    if column not in table or "risk_exact" not in table:
        return pd.DataFrame(columns=["target", "log_ratio"])
    exact = pd.to_numeric(table["risk_exact"], errors="coerce").to_numpy(float)
    card = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
    ok = np.isfinite(exact) & np.isfinite(card) & (exact > 0) & (card > 0)
    return pd.DataFrame({"target": table["target"].to_numpy()[ok], "log_ratio": np.log(exact[ok] / card[ok])})


def _loto_within(rows: pd.DataFrame) -> float:
    targets = rows["target"].unique()
    if len(targets) < 2:
        return math.nan
    inside = []
    for t in targets:
        held, rest = rows[rows["target"] == t], rows[rows["target"] != t]
        c = np.median(rest["log_ratio"])
        inside += list(np.abs(held["log_ratio"] - c) <= math.log(WITHIN) * (1 + 1e-12))
    return float(np.mean(inside))


def fit_card_scale(table: pd.DataFrame, target: str | None = None, column: str = "risk_diag") -> CardScale | None:
    """The :class:`CardScale` of ``column`` on the known pairs of ``table`` without ``target`` (None: all pairs).

    ``table``: study rows at one λ2 (the risks do not depend on λ2). Returns None with fewer than
    :data:`MIN_PAIRS` usable pairs.
    """
    known = training_pairs(table, target) if target is not None else table
    rows = _ratios(known, column)
    if len(rows) < MIN_PAIRS:
        return None
    logs = rows["log_ratio"].to_numpy(float)
    return CardScale(column, float(np.exp(np.median(logs))), int(len(rows)), int(rows["target"].nunique()),
                     _loto_within(rows), float(np.std(logs, ddof=1)))


def calibrated_card_risk(out: pd.DataFrame, train: pd.DataFrame | None, notes: list[str]) -> list[float]:
    """The card's R for the loss model of candidate rows ``out``: scaled to R_exact on the suite's known pairs
    ``train`` when they have both risks (adds ``risk_card_calibrated``), else the card's own ``risk_card``;
    a note says which."""
    scale = fit_card_scale(train, None, CARD_COLUMNS[0]) if train is not None else None
    if scale is None or CARD_COLUMNS[0] not in out:
        notes.append("card risk not calibrated (no suite study with exact and diagonal risks, or no diagonal risk "
                     "from this card): R_card is used as is, and on the mini-suite it runs several times below the "
                     "exact τᵀHτ, so the loss model under-predicts")
        return [float(r) for r in out["risk_card"]]
    out["risk_card_calibrated"] = [scale.apply(r) for r in out[CARD_COLUMNS[0]]]
    notes.append(scale.note())
    return list(out["risk_card_calibrated"])
