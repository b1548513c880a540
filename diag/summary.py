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
from diag.pairs import add_normalised, at_lambda, lam_key, with_run_columns
from diag.transfer import METRICS, ROW_SUFFIX
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

    def flat(self) -> dict[str, int]:
        """Every count under one name (``wins.random``, ``wins_img.meanmap``, …): what is averaged over seeds."""
        out = {k: getattr(self, k) for k in ("n_pairs", "n_rows", "better_keep90", "better_keep90_img",
                                              "lower_ermse", "keep90")}
        out.update({f"wins.{k}": v for k, v in self.wins.items()})
        out.update({f"wins_img.{k}": v for k, v in self.wins_img.items()})
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
    return HeadlineCounts(n_pairs=len(rows) if n_pairs is None else int(n_pairs), n_rows=len(rows),
                          better_keep90=better["ermse"], better_keep90_img=better["img"],
                          lower_ermse=int((rows["ermse"] < rows["ermse_ft_target"]).sum()), keep90=int(kept.sum()),
                          wins=wins, wins_img=wins_img, n_controls=counts)


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
                        mean_acc_norm_se=a_se, mean_ermse_norm_controls=ctrl_means)


def figure2_frame(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """Rows for :func:`diag.figures.figure2`: the proposed pairs plus one row per control variant.

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


# --------------------------------------------------------------------- the issue-9 report


def chosen_lambda2(run: pd.DataFrame, budget: float = DEFAULT_MAX_ACC_DROP) -> pd.Series:
    """Per pair of one run, the largest λ2 of the study's grid whose accuracy on the target's ``val``
    split stays within ``budget`` of θ_ftᵀ's val accuracy (0.0: none does).

    acc_drop = 1 − ``accuracy_val`` / ``accuracy_val_ft_target``, then
    :func:`diag.decide.recommend_lambda2`. Only val accuracies enter: never a test number, never φ.

    Returns:
        Series indexed by (source, target).
    """
    from diag.decide import recommend_lambda2

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


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = pd.Series(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def _over_seeds(counts: list[HeadlineCounts]) -> dict[str, tuple[float, float]]:
    """name → (mean, sd over seeds) of every count."""
    flats = [c.flat() for c in counts]
    return {k: _mean_sd([f[k] for f in flats]) for k in flats[0]}


def _table1_over_seeds(tables: list[pd.DataFrame]) -> pd.DataFrame:
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


@dataclass(frozen=True)
class VariantSummary:
    """Every seed of one variant, and mean ± sd over seeds (``fixed``/``chosen``: name → (mean, sd))."""

    variant: str
    alpha: float
    runs: list[RunSummary]
    fixed: dict
    chosen: dict | None
    table1: pd.DataFrame | None

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


#: Report lines: (count name, label).
_COUNT_LINES = (("better_keep90", "E-RMSE < θ_ftᵀ and acc ≥ 90 % (headline)"),
                ("better_keep90_img", "same, image-specific E-RMSE"),
                ("lower_ermse", "E-RMSE < θ_ftᵀ"), ("keep90", "acc ≥ 90 % of θ_ftᵀ"),
                *((f"wins.{c}", f"beats {VARIANTS[c]} (E-RMSE)") for c in CONTROLS),
                *((f"wins_img.{c}", f"beats {VARIANTS[c]} (img E-RMSE)") for c in CONTROLS))


@dataclass(frozen=True)
class StudyReport:
    """The issue-9 summary of a study table: per variant, per seed, then mean ± sd over seeds.

    Attributes:
        variants: one :class:`VariantSummary` per (variant, α) in the table.
        lambda2: the fixed λ2 (0.7); budget: val accuracy budget of the chosen λ2; keep: the
            headline's accuracy fraction; source: Table 1's source (None: not in the study).
        notes: plain sentences (e.g. the chosen-λ2 headline needs ``--lambda-grid``).
    """

    variants: list[VariantSummary]
    lambda2: float
    budget: float
    keep: float
    source: str | None
    notes: list[str]

    def to_dict(self) -> dict:
        def pm(d):
            return None if d is None else {k: {"mean": m, "sd": s} for k, (m, s) in d.items()}

        def t1(t):
            return None if t is None else t.reset_index().to_dict(orient="records")
        return {"lambda2": self.lambda2, "val_budget": self.budget, "keep_accuracy": self.keep,
                "table1_source": self.source, "notes": self.notes, "headline_uses": "ermse (and ermse_img beside it)",
                "variants": [{"variant": v.variant, "alpha": v.alpha, "seeds": v.seeds,
                              "fixed_lambda2": pm(v.fixed), "chosen_lambda2": pm(v.chosen), "table1": t1(v.table1),
                              "per_seed": [{"seed": r.seed, "fixed_lambda2": r.fixed.flat(),
                                            "chosen_lambda2": None if r.chosen is None else r.chosen.flat(),
                                            "chosen_lambda2_per_pair": r.chosen_lambda2} for r in v.runs]}
                             for v in self.variants]}

    def table(self) -> str:
        """A readable report: the counts per seed and mean ± sd over seeds, then Table 1."""
        out = [f"headline: E-RMSE below θ_ftᵀ while keeping ≥ {self.keep:.0%} of its test accuracy; "
               f"chosen λ2 = largest on the grid with val accuracy within {self.budget:.0%} of θ_ftᵀ's"]
        for v in self.variants:
            out.append(f"\nvariant {v.variant} (α={v.alpha:g}), seeds {v.seeds}")
            for title, agg, per in ((f"λ2 = {self.lambda2:g}", v.fixed, [r.fixed for r in v.runs]),
                                    ("validation-chosen λ2", v.chosen, [r.chosen for r in v.runs])):
                if agg is None:
                    continue
                n = per[0].n_pairs
                out.append(f"  {f'{title} ({n} ordered pairs)':46s}" + "".join(f"  seed {r.seed:>3d}" for r in v.runs)
                           + "   mean ± sd")
                for key, label in _COUNT_LINES:
                    m, s = agg[key]
                    cells = "".join(f"  {c.flat()[key]:>8d}" for c in per)
                    out.append(f"    {label:44s}{cells}   {m:.1f} ± " + (f"{s:.1f}" if s == s else "— (one seed)"))
            if v.table1 is not None:
                out.append(_format_table1(v.table1, self.source, len(v.runs)))
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _format_table1(t: pd.DataFrame, source: str, n_seeds: int) -> str:
    sd = "sd_seeds" if n_seeds > 1 else "sd_targets"
    head = (f"  Table 1 analog, source {source} (mean over targets; ± sd over "
            f"{'seeds' if n_seeds > 1 else 'targets, one seed'})")
    lines = [head, f"    {'model':38s} {'accuracy':>15s} {'E-RMSE':>15s} {'img E-RMSE':>15s}   paper acc/E-RMSE"]
    for model, r in t.iterrows():
        cells = " ".join(f"{r[f'{m}_mean']:7.3f}±{r[f'{m}_{sd}']:<7.3f}" for m in ("accuracy", "ermse", "ermse_img")
                         if f"{m}_mean" in r)
        paper = f"   {r['paper_accuracy']:.3f} / {r['paper_ermse']:.3f}" if r["paper_accuracy"] == r["paper_accuracy"] else ""
        lines.append(f"    {model:38s} {cells}{paper}")
    return "\n".join(lines)


def study_report(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2, budget: float = DEFAULT_MAX_ACC_DROP,
                 keep: float = KEEP_ACCURACY, source: str = "imagenette") -> StudyReport:
    """The :class:`StudyReport` of a study table (any number of seeds, variants and α).

    ``source`` is Table 1's source; when the study has no such source the first one is used
    (said in ``notes``).
    """
    df = with_run_columns(add_normalised(df))
    notes = []
    sources = sorted(df["source"].unique())
    if source not in sources:
        notes.append(f"Table 1: '{source}' is not a source of this study; using '{sources[0]}'")
        source = sources[0]
    if df["lambda2"].map(lam_key).nunique() < 2:
        notes.append("the validation-chosen λ2 headline needs a λ2 grid: run `diag study --lambda-grid`")
    variants = []
    for (variant, alpha), part in df.groupby(["variant", "alpha"], sort=True):
        runs = [summarize_run(run, source, lambda2, budget, keep) for _, run in part.groupby("seed", sort=True)]
        chosen = _over_seeds([r.chosen for r in runs]) if all(r.chosen is not None for r in runs) else None
        variants.append(VariantSummary(str(variant), float(alpha), runs, _over_seeds([r.fixed for r in runs]), chosen,
                                       _table1_over_seeds([r.table1 for r in runs])))
    return StudyReport(variants, float(lambda2), float(budget), float(keep), source, notes)


def select_run(df: pd.DataFrame, variant: str | None = None, seed: int | str | None = None) -> pd.DataFrame:
    """Rows of one θ_ft* variant (default ``paper`` when present, else the first) and one training seed
    (default the smallest; ``"all"`` keeps every seed): per-pair analyses must not count a pair once per seed.

    Raises:
        UnknownNameError: a variant or seed the table does not hold.
    """
    df = with_run_columns(df)
    have = sorted(df["variant"].unique())
    variant = variant or ("paper" if "paper" in have else have[0])
    if variant not in have:
        raise unknown("variant of this study", variant, have)
    df = df[df["variant"] == variant]
    if seed == "all":
        return df.reset_index(drop=True)
    seeds = sorted(int(s) for s in df["seed"].unique())
    seed = seeds[0] if seed is None else int(seed)
    if seed not in seeds:
        raise unknown("seed of this study", str(seed), [str(s) for s in seeds])
    return df[df["seed"] == seed].reset_index(drop=True)
