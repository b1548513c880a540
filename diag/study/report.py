"""The study report: headline counts, their chosen-λ2 twins and Table 1, over seeds, per θ_ft* variant.

:func:`study_report` is what ``diag summarize`` prints (and ``--json`` returns): per variant the
run summaries of :mod:`diag.study.summary`, their mean ± sd over seeds, Table 1, and the loss
model's fit to the measured val loss change over every pair × λ2 (:mod:`diag.decide.loss_model`;
pooled over seeds, and per seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from diag.constants import DEFAULT_MAX_ACC_DROP, KEEP_ACCURACY, PAPER_LAMBDA2
from diag.decide.loss_model import calibrate, calibration_text, predicted_vs_measured
from diag.study.summary import (CONTROLS, VARIANTS, RunSummary, over_seeds, summarize_run, table1_over_seeds)
from diag.table import add_normalised, lam_key, with_run_columns

@dataclass(frozen=True)
class VariantSummary:
    """Every seed of one variant, and mean ± sd over seeds (``fixed``/``chosen``: name → (mean, sd)).

    ``loss_model``: :func:`diag.decide.loss_model.calibrate` over every pair × λ2 of the variant's seeds;
    ``loss_model_per_seed``: the same per seed.
    """

    variant: str
    alpha: float
    runs: list[RunSummary]
    fixed: dict
    chosen: dict | None
    table1: pd.DataFrame | None
    loss_model: dict | None = None
    loss_model_per_seed: dict | None = None

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


#: Report lines: (count name, label).
_COUNT_LINES = (("better_keep90", "E-RMSE < θ_ftᵀ and acc ≥ 90 % (headline)"),
                ("better_keep90_img", "same, image-specific E-RMSE"),
                ("lower_ermse", "E-RMSE < θ_ftᵀ"), ("keep90", "acc ≥ 90 % of θ_ftᵀ"),
                *((f"wins.{c}", f"beats {VARIANTS[c]} (E-RMSE)") for c in CONTROLS),
                # not against the mean-φ map: its image-specific E-RMSE is 1 by construction, which only ρ̄ > 0.5
                # beats (not even θ_ft*ᵀ); the image-level test (ρ̄ > 0) below is that comparison, winnable
                *((f"wins_img.{c}", f"beats {VARIANTS[c]} (img E-RMSE)") for c in CONTROLS if c != "meanmap"),
                ("image.signal", "ρ̄ > 0 (95% CI over images)"),
                ("image.beats_other_rescaled", "ρ̄ > τ* of other source at ‖τ*ˢ‖ (paired)"),
                ("image.beats_ft_target", "ρ̄ > θ_ftᵀ's (paired)"),
                ("image.upper_signal", "θ_ft*ᵀ (upper bound): ρ̄ > 0"),
                *((f"corr.{r}", f"mean ρ̄, {r.replace('_', ' ')}") for r in ("proposed", "ft_target", "other_rescaled",
                                                                            "ftx_target")))


@dataclass(frozen=True)
class StudyReport:
    """The summary of a study table: per variant, per seed, then mean ± sd over seeds.

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
                              "loss_model": v.loss_model, "loss_model_per_seed": v.loss_model_per_seed,
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
                    if key not in agg:
                        continue  # a table written before the image-level columns
                    m, s = agg[key]
                    fmt = ".3f" if key.startswith("corr.") else ".1f"
                    cells = "".join(f"  {c.flat()[key]:>8{'.3f' if key.startswith('corr.') else 'd'}}" for c in per)
                    out.append(f"    {label:44s}{cells}   {m:{fmt}} ± " + (f"{s:{fmt}}" if s == s else "— (one seed)"))
            if v.table1 is not None:
                out.append(_format_table1(v.table1, self.source, len(v.runs)))
            if v.loss_model is not None:
                out += [f"  {line}" for line in calibration_text(v.loss_model)]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _format_table1(t: pd.DataFrame, source: str, n_seeds: int) -> str:
    sd = "sd_seeds" if n_seeds > 1 else "sd_targets"
    head = (f"  Table 1 analog, source {source} (mean over targets; ± sd over "
            f"{'seeds' if n_seeds > 1 else 'targets, one seed'})")
    lines = [head, f"    {'model':38s} {'accuracy':>15s} {'E-RMSE':>15s} {'img E-RMSE':>15s} {'ρ̄':>15s}   "
                   "paper acc/E-RMSE"]
    for model, r in t.iterrows():
        cells = " ".join(f"{r[f'{m}_mean']:7.3f}±{r[f'{m}_{sd}']:<7.3f}" for m in ("accuracy", "ermse", "ermse_img",
                                                                                   "corr_img")
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
        chosen = over_seeds([r.chosen for r in runs]) if all(r.chosen is not None for r in runs) else None
        fit = predicted_vs_measured(part)
        per_seed = {int(seed): calibrate(rows) for seed, rows in fit.groupby("seed", sort=True)} if "seed" in fit else {}
        variants.append(VariantSummary(str(variant), float(alpha), runs, over_seeds([r.fixed for r in runs]), chosen,
                                       table1_over_seeds([r.table1 for r in runs]), calibrate(fit), per_seed))
    return StudyReport(variants, float(lambda2), float(budget), float(keep), source, notes)
