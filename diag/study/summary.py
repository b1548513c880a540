"""Summaries of a study table: the headline counts, Figure 2's frame and the Table 1 analogue.

:func:`summarize` reads one run (one seed and variant); :func:`study_report` the whole table:
for each variant, per seed and then mean ± sd over seeds, the headline count (E-RMSE below
θ_ftᵀ while keeping ≥ 90 % of its accuracy) at λ2 = 0.7 and at the validation-chosen λ2 (per
pair, from the target's ``val`` accuracies only), the same count with the image-specific
E-RMSE, the wins against each control on both, and the Table 1 analogue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import pandas as pd

from diag.constants import DEFAULT_MAX_ACC_DROP, KEEP_ACCURACY, PAPER_LAMBDA2, PAPER_TABLE1
from diag.table import add_normalised, at_lambda, lam_key
from diag.transfer.budget import recommend_lambda2
from diag.transfer.evaluate import ROW_SUFFIX
from diag.transfer.metrics import METRICS
from train.errors import DataError, unknown

#: Figure-2 variant names of the control columns.
VARIANTS = {"random": "random τ (τ*ˢ norms)", "other": "τ* of other source",
            "other_rescaled": "τ* of other source (‖τ*ˢ‖)", "meanmap": "mean φ map (source)"}


#: The controls the headline is compared with (study-table column suffixes).
CONTROLS = ("random", "meanmap", "other", "other_rescaled")


@dataclass(frozen=True)
class HeadlineCounts:
    """Counts over the ordered pairs of one run at one λ2 rule (fixed or validation-chosen).

    Attributes:
        n_pairs: ordered pairs; n_rows: pairs with a row (the chosen-λ2 rule drops pairs where
            no λ2 keeps the val accuracy within budget: they count as failures everywhere).
        better_keep90: E-RMSE below θ_ftᵀ's while keeping ≥ 90 % of its test accuracy (headline).
        better_keep90_img: the same with the image-specific E-RMSE (``ermse_img``).
        lower_ermse, keep90: the two halves of the headline.
        wins, wins_img: control → pairs whose E-RMSE (image-specific E-RMSE) is below the control's.
        n_controls: control → pairs where the control was scored.
        image: the image-level test (tables with ``corr_img``): ``signal`` = pairs whose ρ̄ has a
            95 % CI above 0 (over images), ``beats_other_rescaled`` / ``beats_ft_target`` = pairs where
            the paired per-image ρ̄ difference against that row has a 95 % CI above 0, ``upper_signal``
            = the same as ``signal`` for θ_ft*ᵀ (the in-domain upper bound).
        corr: row → mean ρ̄ over pairs (``proposed``, ``ft_target``, ``other_rescaled``, ``ftx_target``).
    """

    n_pairs: int
    n_rows: int
    better_keep90: int
    better_keep90_img: int
    lower_ermse: int
    keep90: int
    wins: dict
    wins_img: dict
    n_controls: dict
    image: dict = field(default_factory=dict)
    corr: dict = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """Every count under one name (``wins.random``, ``image.signal``, ``corr.proposed``, …): what is averaged over
        seeds (``corr.*`` are mean ρ̄, the rest counts)."""
        out = {k: getattr(self, k) for k in ("n_pairs", "n_rows", "better_keep90", "better_keep90_img",
                                              "lower_ermse", "keep90")}
        out.update({f"wins.{k}": v for k, v in self.wins.items()})
        out.update({f"wins_img.{k}": v for k, v in self.wins_img.items()})
        out.update({f"image.{k}": v for k, v in self.image.items()})
        out.update({f"corr.{k}": v for k, v in self.corr.items()})
        return out


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
    image: dict = field(default_factory=dict)
    corr: dict = field(default_factory=dict)

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
        if self.image:
            c, i = self.corr, self.image
            out.append(f"image-level test (ρ̄: per-image correlation of the centred maps; chance and any fixed prior 0): "
                       f"mean ρ̄ {c.get('proposed', float('nan')):+.3f} (θ_ftᵀ {c.get('ft_target', float('nan')):+.3f}, "
                       f"τ* of another source at ‖τ*ˢ‖ {c.get('other_rescaled', float('nan')):+.3f}, upper bound θ_ft*ᵀ "
                       f"{c.get('ftx_target', float('nan')):+.3f}); ρ̄ > 0 in {i['signal']}/{n} pairs (95% CI), above "
                       f"the other source's τ* in {i['beats_other_rescaled']}/{n} and above θ_ftᵀ in "
                       f"{i['beats_ft_target']}/{n} (paired per-image tests)")
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


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sd with ddof 1 over √n) of the numeric, non-missing values; NaN when undefined."""
    v = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna()
    if v.empty:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def headline_counts(rows: pd.DataFrame, n_pairs: int | None = None, keep: float = KEEP_ACCURACY) -> HeadlineCounts:
    """The headline and control counts over ``rows`` (one row per pair; see :class:`HeadlineCounts`).

    ``n_pairs`` (default ``len(rows)``) counts pairs without a row (no λ2 chosen) as failures.
    """
    kept = rows["accuracy"] >= keep * rows["accuracy_ft_target"]
    better = {kind: int(((rows[m] < rows[f"{m}_ft_target"]) & kept).sum()) if f"{m}_ft_target" in rows else 0
              for kind, m in (("ermse", "ermse"), ("img", "ermse_img"))}
    wins, wins_img, counts = {}, {}, {}
    for ctrl in CONTROLS:
        have = rows[f"ermse_{ctrl}"].notna() if f"ermse_{ctrl}" in rows else pd.Series(False, index=rows.index)
        counts[ctrl] = int(have.sum())
        wins[ctrl] = int((rows["ermse"] < rows[f"ermse_{ctrl}"])[have].sum()) if counts[ctrl] else 0
        img = f"ermse_img_{ctrl}"
        wins_img[ctrl] = int((rows["ermse_img"] < rows[img])[have].sum()) if counts[ctrl] and img in rows else 0
    image, corr = image_level(rows)
    return HeadlineCounts(n_pairs=len(rows) if n_pairs is None else int(n_pairs), n_rows=len(rows),
                          better_keep90=better["ermse"], better_keep90_img=better["img"],
                          lower_ermse=int((rows["ermse"] < rows["ermse_ft_target"]).sum()), keep90=int(kept.sum()),
                          wins=wins, wins_img=wins_img, n_controls=counts, image=image, corr=corr)


#: Rows whose mean ρ̄ the headline reports (study-table suffixes; "" = the proposed model).
CORR_ROWS = {"proposed": "", "ft_target": "_ft_target", "other_rescaled": "_other_rescaled",
             "ftx_target": "_ftx_target"}


#: z of the image-level test's 95 % CIs (ρ̄ − z·se > 0).
IMAGE_Z = 1.96


def ci_above_zero(rows: pd.DataFrame, mean: str = "corr_img", se: str = "corr_img_se", z: float = IMAGE_Z) -> pd.Series:
    """Per row: whether ``mean`` − z·``se`` > 0 (all False when either column is missing): the image-level test
    of one row (ρ̄ > 0, or a paired ρ̄ difference above 0)."""
    if mean not in rows.columns or se not in rows.columns:
        return pd.Series(False, index=rows.index)
    return pd.to_numeric(rows[mean], errors="coerce") - z * pd.to_numeric(rows[se], errors="coerce") > 0


def image_level(rows: pd.DataFrame, z: float = IMAGE_Z) -> tuple[dict[str, int], dict[str, float]]:
    """The image-level test over pairs: counts of 95 % CIs above 0 (see :class:`HeadlineCounts`) and mean ρ̄ per row.

    Empty for tables written before ``corr_img`` existed.
    """
    if "corr_img" not in rows.columns:
        return {}, {}

    def above(mean: str, se: str) -> int:
        return int(ci_above_zero(rows, mean, se, z).sum())

    image = {"signal": above("corr_img", "corr_img_se"),
             "beats_other_rescaled": above("corr_img_vs_other_rescaled", "corr_img_vs_other_rescaled_se"),
             "beats_ft_target": above("corr_img_vs_ft_target", "corr_img_vs_ft_target_se"),
             "upper_signal": above("corr_img_ftx_target", "corr_img_se_ftx_target")}
    corr = {name: float(pd.to_numeric(rows[f"corr_img{suffix}"], errors="coerce").mean())
            for name, suffix in CORR_ROWS.items() if f"corr_img{suffix}" in rows.columns}
    return image, corr


def summarize(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2, keep: float = KEEP_ACCURACY) -> StudySummary:
    """Headline counts of one run at ``lambda2`` (see :class:`StudySummary`); ``keep`` is the accuracy fraction."""
    rows = add_normalised(at_lambda(df, lambda2) if "lambda2" in df.columns else df)
    c = headline_counts(rows, keep=keep)
    ctrl_means = {ctrl: (mean_se(rows[f"ermse_norm_{ctrl}"])[0] if f"ermse_norm_{ctrl}" in rows else float("nan"))
                  for ctrl in CONTROLS if f"ermse_{ctrl}" in rows.columns}
    e_mean, e_se = mean_se(rows["ermse_norm"])
    a_mean, a_se = mean_se(rows["acc_norm"])
    return StudySummary(n_pairs=len(rows), lambda2=float(lambda2), n_better_keep90=c.better_keep90,
                        n_lower_ermse=c.lower_ermse, n_keep90=c.keep90, n_beat_random=c.wins["random"],
                        n_beat_meanmap=c.wins["meanmap"], n_beat_other=c.wins["other"],
                        n_beat_other_rescaled=c.wins["other_rescaled"], n_controls=c.n_controls,
                        mean_ermse_norm=e_mean, mean_ermse_norm_se=e_se, mean_acc_norm=a_mean,
                        mean_acc_norm_se=a_se, mean_ermse_norm_controls=ctrl_means, image=c.image, corr=c.corr)


def figure2_frame(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Rows for :func:`diag.study.figures.figure2`: the proposed pairs plus one row per control variant.

    Control rows carry ``row`` (see :data:`VARIANTS`; ``proposed`` for the transfer) and their own ``acc_norm`` /
    ``ermse_norm``; the mean-map control keeps θ_ftᵀ's accuracy (acc_norm = 1).
    """
    rows = add_normalised(at_lambda(df, lambda2) if "lambda2" in df.columns else df)
    parts = [rows.assign(row="proposed")]
    for ctrl, label in VARIANTS.items():
        e, a = f"ermse_norm_{ctrl}", f"acc_norm_{ctrl}"
        if e not in rows.columns or rows[e].isna().all():
            continue
        part = rows[["source", "target"]].copy()
        part["row"] = label
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
        if not all(c in rows.columns for c in cols.values()) or rows[cols["ermse"]].isna().all():
            continue  # e.g. the plain-eq.-8 row of a method's rows in a plain-only selection
        rec = {"model": label, "n_targets": int(rows[cols["ermse"]].notna().sum())}
        for m, c in cols.items():
            v = pd.to_numeric(rows[c], errors="coerce")
            rec[f"{m}_mean"], rec[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if v.count() > 1 else float("nan")
        paper = PAPER_TABLE1.get(label)
        rec["paper_accuracy"], rec["paper_ermse"] = paper if paper else (float("nan"), float("nan"))
        out.append(rec)
    return pd.DataFrame(out).set_index("model")


# --------------------------------------------------------------------- the study report


def chosen_lambda2(run: pd.DataFrame, budget: float = DEFAULT_MAX_ACC_DROP) -> pd.Series:
    """Per pair of one run, the largest λ2 of the study's grid whose accuracy on the target's ``val``
    split stays within ``budget`` of θ_ftᵀ's val accuracy (0.0: none does).

    acc_drop = 1 − ``accuracy_val`` / ``accuracy_val_ft_target``, then
    :func:`diag.decide.rules.recommend_lambda2`. Only val accuracies enter: never a test number, never φ.

    Returns:
        Series indexed by (source, target).
    """

    if not {"accuracy_val", "accuracy_val_ft_target"} <= set(run.columns):
        raise DataError("the study table has no val accuracies (accuracy_val): rerun `diag study` to add them")
    grid = run.assign(acc_drop=1.0 - run["accuracy_val"] / run["accuracy_val_ft_target"].clip(lower=1e-12))
    return grid.groupby(["source", "target"]).apply(lambda g: recommend_lambda2(g, budget), include_groups=False)


def _rows_at(run: pd.DataFrame, lam: pd.Series) -> pd.DataFrame:
    """The row of each pair at its λ2 in ``lam`` (pairs with λ2 = 0 have none)."""
    want = {(s, t): lam_key(v) for (s, t), v in lam.items() if v > 0}
    hit = [want.get((s, t)) == lam_key(v) for s, t, v in zip(run["source"], run["target"], run["lambda2"])]
    return run[hit]


@dataclass(frozen=True)
class RunSummary:
    """One seed of one variant: the headline at λ2 = 0.7 and at the validation-chosen λ2, and Table 1."""
    seed: int
    variant: str
    alpha: float
    fixed: HeadlineCounts
    chosen: HeadlineCounts | None
    chosen_lambda2: dict
    table1: pd.DataFrame | None


def summarize_run(run: pd.DataFrame, source: str | None, lambda2: float = PAPER_LAMBDA2,
                  budget: float = DEFAULT_MAX_ACC_DROP, keep: float = KEEP_ACCURACY) -> RunSummary:
    """:class:`RunSummary` of the rows of one (seed, variant, α)."""
    n_pairs = run[["source", "target"]].drop_duplicates().shape[0]
    fixed = headline_counts(at_lambda(run, lambda2), n_pairs, keep)
    chosen, lam = None, {}
    if run["lambda2"].map(lam_key).nunique() > 1:
        series = chosen_lambda2(run, budget)
        chosen = headline_counts(_rows_at(run, series), n_pairs, keep)
        lam = {f"{s}->{t}": float(v) for (s, t), v in series.items()}
    t1 = table1(run, source, lambda2) if source is not None else None
    return RunSummary(int(run["seed"].iloc[0]), str(run["variant"].iloc[0]), float(run["alpha"].iloc[0]), fixed,
                      chosen, lam, t1)


def mean_sd(values: list[float]) -> tuple[float, float]:
    v = pd.Series(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def over_seeds(counts: list[HeadlineCounts]) -> dict[str, tuple[float, float]]:
    """name → (mean, sd over seeds) of every count."""
    flats = [c.flat() for c in counts]
    return {k: mean_sd([f[k] for f in flats]) for k in flats[0]}


def table1_over_seeds(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Table 1 mean over seeds of each seed's mean over targets, with the sd over seeds and over targets."""
    out = pd.DataFrame(index=tables[0].index)
    for m in METRICS:
        if f"{m}_mean" not in tables[0]:
            continue
        means = pd.concat([t[f"{m}_mean"] for t in tables], axis=1)
        out[f"{m}_mean"] = means.mean(axis=1)
        out[f"{m}_sd_seeds"] = means.std(axis=1, ddof=1) if len(tables) > 1 else float("nan")
        out[f"{m}_sd_targets"] = pd.concat([t[f"{m}_sd"] for t in tables], axis=1).mean(axis=1)
    out["n_targets"] = tables[0]["n_targets"]
    out["paper_accuracy"], out["paper_ermse"] = tables[0]["paper_accuracy"], tables[0]["paper_ermse"]
    return out
