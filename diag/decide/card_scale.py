"""The card's risk calibrated on the suite's known pairs: one scale, fitted without the target.

A card's risk may be biased: the diagonal Σ diag(Hᵀ)_i τ_i² misses every off-diagonal coupling
(on the mini-suite R_diag runs ~20× below the exact τᵀHᵀτ), the eigenpair card (top-k + residual
diagonal) ~4× below; the trace-scaled K-FAC card (the default) sits near 1×. A steady bias is
calibrated away by one multiplicative scale fitted on known pairs:

    R_cal(τ) = c · R_column(τ),   c = median over the known pairs of R_exact ÷ R_column,

with the known pairs those of :func:`diag.decide.record.training_pairs` (the target neither
as target nor as source, as every prediction for a new target is fitted). :func:`fit_card_scale`
also says how well it held, leave one target out over the known pairs: the share within ×1.5 of
R_exact and the spread of the log ratio. ``risk_card`` is fitted only on rows of the same card form
(the study's ``card_form`` column): a K-FAC card is never scaled by an eigenpair card's bias.
:func:`calibrated_card_risk` uses the column whose scale held best. The scale belongs to a backbone and
its curvature settings — fitted on a suite of the same backbone, it is not carried to another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diag.decide.loss_model import WITHIN
from diag.decide.record import training_pairs

__all__ = ["CARD_COLUMNS", "CardScale", "calibrated_card_risk", "fit_card_scale"]

#: Card risks a scale can be fitted for; :func:`calibrated_card_risk` takes the one whose scale held best (ties: first).
CARD_COLUMNS = ("risk_card", "risk_diag")
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


def fit_card_scale(table: pd.DataFrame, target: str | None = None, column: str = "risk_diag",
                   card_form: str | None = None) -> CardScale | None:
    """The :class:`CardScale` of ``column`` on the known pairs of ``table`` without ``target`` (None: all pairs).

    ``table``: study rows at one λ2 (the risks do not depend on λ2). ``card_form``: for ``risk_card``,
    only rows whose ``card_form`` column names this form (a table without the column: None); None reads
    every row. Returns None with fewer than :data:`MIN_PAIRS` usable pairs.
    """
    known = training_pairs(table, target) if target is not None else table
    if column == "risk_card" and card_form is not None:
        if "card_form" not in known:
            return None
        known = known[known["card_form"].astype(str) == card_form]
    rows = _ratios(known, column)
    if len(rows) < MIN_PAIRS:
        return None
    logs = rows["log_ratio"].to_numpy(float)
    return CardScale(column, float(np.exp(np.median(logs))), int(len(rows)), int(rows["target"].nunique()),
                     _loto_within(rows), float(np.std(logs, ddof=1)))


def calibrated_card_risk(out: pd.DataFrame, train: pd.DataFrame | None, notes: list[str],
                         card_form: str | None = None) -> list[float]:
    """The card's R for the loss model of candidate rows ``out``: scaled to R_exact on the suite's known pairs
    ``train`` (adds ``risk_card_calibrated``) by the column of :data:`CARD_COLUMNS` present in ``out`` whose
    scale held best leaving one target out (``risk_card`` only from rows of ``card_form``), else the card's
    own ``risk_card``; a note says which."""
    scales = [fit_card_scale(train, None, c, card_form) for c in CARD_COLUMNS if c in out] if train is not None else []
    scales = [s for s in scales if s is not None]
    if not scales:
        notes.append("card risk not calibrated (no suite study with exact risks beside this card's form or the "
                     "diagonal): R_card is used as is" + (", and an eigenpair card runs several times below the "
                                                         "exact τᵀHτ, so the loss model under-predicts"
                                                         if card_form == "eig" else ""))
        return [float(r) for r in out["risk_card"]]
    best = max(scales, key=lambda c: -1.0 if math.isnan(c.loto_within) else c.loto_within)
    out["risk_card_calibrated"] = [best.apply(r) for r in out[best.column]]
    notes.append(best.note())
    return list(out["risk_card_calibrated"])
