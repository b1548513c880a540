"""Summaries of a study table: the headline counts, Figure 2's frame and the Table 1 analogue."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import pandas as pd

from diag.constants import KEEP_ACCURACY, PAPER_LAMBDA2, PAPER_TABLE1
from diag.pairs import add_normalised, at_lambda
from diag.transfer import METRICS, ROW_SUFFIX
from train.errors import unknown

#: Figure-2 variant names of the control columns.
VARIANTS = {"random": "random τ (τ*ˢ norms)", "other": "τ* of other source",
            "other_rescaled": "τ* of other source (‖τ*ˢ‖)", "meanmap": "mean φ map (source)"}


@dataclass(frozen=True)
class StudySummary:
    """Headline counts of a study at one λ2 (the paper's claim and the controls).

    Attributes:
        n_pairs: pairs scored.
        lambda2: the λ2 summarised.
        n_better_keep90: pairs with E-RMSE below θ_ftᵀ's while keeping ≥ 90 % of its accuracy
            (the paper's headline: the transfer improves explanations at little accuracy cost).
        n_lower_ermse: pairs with E-RMSE below θ_ftᵀ's.
        n_keep90: pairs keeping ≥ 90 % of θ_ftᵀ's accuracy.
        n_beat_random, n_beat_meanmap, n_beat_other, n_beat_other_rescaled: pairs whose E-RMSE is below
            that control's (``other_rescaled``: the other source's τ* at ‖τ*ˢ‖)
            (NaN-valued controls are not counted; ``n_controls`` says how many had each).
        mean_ermse_norm, mean_acc_norm: means of E-RMSE and accuracy ÷ θ_ftᵀ, with standard
            errors over pairs (``*_se``; pairs share domains, so these are optimistic).
    """

    n_pairs: int
    lambda2: float
    n_better_keep90: int
    n_lower_ermse: int
    n_keep90: int
    n_beat_random: int
    n_beat_meanmap: int
    n_beat_other: int
    n_beat_other_rescaled: int = 0
    n_controls: dict = field(default_factory=dict)
    mean_ermse_norm: float = float("nan")
    mean_ermse_norm_se: float = float("nan")
    mean_acc_norm: float = float("nan")
    mean_acc_norm_se: float = float("nan")
    mean_ermse_norm_controls: dict = field(default_factory=dict)

    def verdicts(self) -> list[str]:
        """Plain sentences, including when the method does NOT beat a control."""
        n = self.n_pairs
        out = [f"{self.n_better_keep90}/{n} pairs: lower E-RMSE than θ_ftᵀ while keeping ≥ 90 % of its accuracy "
               f"(lower E-RMSE: {self.n_lower_ermse}/{n}; accuracy kept ≥ 90 %: {self.n_keep90}/{n})"]
        for ctrl in ("random", "meanmap", "other", "other_rescaled"):
            label = VARIANTS[ctrl]
            m = self.n_controls.get(ctrl, 0)
            if not m:
                continue
            k = getattr(self, f"n_beat_{ctrl}")
            if k > m / 2:
                out.append(f"the transfer beats the control '{label}' on E-RMSE in {k}/{m} pairs")
            else:
                out.append(f"the transfer does NOT beat the control '{label}' on E-RMSE: better in only {k}/{m} pairs")
        return out

    def __repr__(self) -> str:
        return (f"StudySummary(n_pairs={self.n_pairs}, λ2={self.lambda2:g}, better&keep90={self.n_better_keep90}, "
                f"beat random={self.n_beat_random}, beat meanmap={self.n_beat_meanmap}, "
                f"ermse_norm={self.mean_ermse_norm:.3f}±{self.mean_ermse_norm_se:.3f}, "
                f"acc_norm={self.mean_acc_norm:.3f}±{self.mean_acc_norm_se:.3f})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdicts"] = self.verdicts()
        return d


def _mean_se(v: pd.Series) -> tuple[float, float]:
    v = pd.to_numeric(v, errors="coerce").dropna()
    if v.empty:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def summarize(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2, keep: float = KEEP_ACCURACY) -> StudySummary:
    """Headline counts at ``lambda2`` (see :class:`StudySummary`); ``keep`` is the accuracy fraction."""
    rows = add_normalised(at_lambda(df, lambda2) if "lambda2" in df.columns else df)
    lower = rows["ermse"] < rows["ermse_ft_target"]
    kept = rows["accuracy"] >= keep * rows["accuracy_ft_target"]
    beats, counts, ctrl_means = {}, {}, {}
    for ctrl in ("random", "meanmap", "other", "other_rescaled"):
        col = f"ermse_{ctrl}"
        if col not in rows.columns:
            beats[ctrl], counts[ctrl] = 0, 0
            continue
        have = rows[col].notna()
        counts[ctrl] = int(have.sum())
        beats[ctrl] = int((rows["ermse"] < rows[col])[have].sum())
        ctrl_means[ctrl] = _mean_se(rows[f"ermse_norm_{ctrl}"])[0] if f"ermse_norm_{ctrl}" in rows else float("nan")
    e_mean, e_se = _mean_se(rows["ermse_norm"])
    a_mean, a_se = _mean_se(rows["acc_norm"])
    return StudySummary(n_pairs=len(rows), lambda2=float(lambda2), n_better_keep90=int((lower & kept).sum()),
                        n_lower_ermse=int(lower.sum()), n_keep90=int(kept.sum()), n_beat_random=beats["random"],
                        n_beat_meanmap=beats["meanmap"], n_beat_other=beats["other"],
                        n_beat_other_rescaled=beats["other_rescaled"], n_controls=counts,
                        mean_ermse_norm=e_mean, mean_ermse_norm_se=e_se, mean_acc_norm=a_mean,
                        mean_acc_norm_se=a_se, mean_ermse_norm_controls=ctrl_means)


def figure2_frame(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Rows for :func:`diag.figures.figure2`: the proposed pairs plus one row per control variant.

    Control rows carry ``variant`` (see :data:`VARIANTS`) and their own ``acc_norm`` /
    ``ermse_norm``; the mean-map control keeps θ_ftᵀ's accuracy (acc_norm = 1).
    """
    rows = add_normalised(at_lambda(df, lambda2) if "lambda2" in df.columns else df)
    parts = [rows.assign(variant="proposed")]
    for ctrl, label in VARIANTS.items():
        e, a = f"ermse_norm_{ctrl}", f"acc_norm_{ctrl}"
        if e not in rows.columns or rows[e].isna().all():
            continue
        part = rows[["source", "target"]].copy()
        part["variant"] = label
        part["ermse_norm"] = rows[e]
        part["acc_norm"] = rows[a] if a in rows.columns else 1.0
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


#: Table-1 rows of the study table: row label → column suffix ("" = proposed).
TABLE1_ROWS = ROW_SUFFIX


def table1(df: pd.DataFrame, source: str, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Table 1 analogue: one source over every other target, mean ± sd per model row.

    Returns:
        DataFrame indexed by model row, columns ``<metric>_mean`` and ``<metric>_sd`` for the six
        metrics, ``n_targets``, and the paper's accuracy / E-RMSE (``paper_accuracy``,
        ``paper_ermse``; NaN for rows the paper does not have).

    Raises:
        UnknownNameError: ``source`` is not a source of the study.
    """
    rows = at_lambda(df, lambda2) if "lambda2" in df.columns else df
    sources = sorted(rows["source"].unique())
    if source not in sources:
        raise unknown("study source", source, sources)
    rows = rows[rows["source"] == source]
    out = []
    for label, suffix in TABLE1_ROWS.items():
        cols = {m: (m if not suffix else f"{m}_{suffix}") for m in METRICS}
        if not all(c in rows.columns for c in cols.values()):
            continue
        rec = {"model": label, "n_targets": int(rows[cols["ermse"]].notna().sum())}
        for m, c in cols.items():
            v = pd.to_numeric(rows[c], errors="coerce")
            rec[f"{m}_mean"], rec[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.count() > 1 else float("nan")
        paper = PAPER_TABLE1.get(label)
        rec["paper_accuracy"], rec["paper_ermse"] = paper if paper else (float("nan"), float("nan"))
        out.append(rec)
    return pd.DataFrame(out).set_index("model")
