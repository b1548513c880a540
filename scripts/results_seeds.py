"""The README block of a committed study table holding several training seeds (used by results_report.py).

Every number is computed here from the table by the library's own functions — the headline and its
controls per seed, the loss model's calibration, the card's fidelity, the coverage of the ranking's
intervals, the screen's verdicts against the test split, the rankers against their test-retest
ceiling — and printed as mean ± sd over seeds (or pooled over seeds with a confidence interval).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from diag.constants import PAPER_LAMBDA2
from diag.decide.card_scale import fit_card_scale
from diag.decide.ceiling import ranking_ceiling
from diag.decide.evaluation import ORACLE, RECORD, evaluate_loto, evaluate_rankers, loto_coverage
from diag.decide.loss_model import agreement, calibrate, logit_model_agreement, predicted_vs_measured, retest
from diag.decide.predictor import tier_features
from diag.decide.screen_check import validate_screen
from diag.study.summary import summarize, summarize_run
from diag.stats import wilson_interval
from diag.table import at_lambda, of_method, read_checked_csv

N_BOOT = 1000
#: What ``risk_card`` was computed from, by the table's ``card_form`` (tables without the column: ``eig``).
CARD_LABELS = {"eig": "top-8 eigenpairs + residual diagonal",
               "kfac": "trace-scaled K-FAC card (bfloat16 factors) + diagonal"}
QUANTITY_NAMES = {"ermse_norm": "E-RMSE ÷ θ_ftᵀ's", "acc_drop": "accuracy drop at λ2 = 0.7",
                  "gain": "gain 1 − E-RMSE ÷ θ_ftᵀ's (every λ2)"}


def _msd(values) -> str:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not v.size:
        return "n/a"
    sd = v.std(ddof=1) if v.size > 1 else math.nan
    return f"{v.mean():.3g} ± {sd:.2g}" if math.isfinite(sd) else f"{v.mean():.3g}"


def _headline(table: pd.DataFrame, seeds: list[int], over: str = "seeds") -> list[str]:
    per = {}
    for seed in seeds:
        run = table[table["seed"] == seed]
        s, r = summarize(run, PAPER_LAMBDA2), summarize_run(run, None)
        per[seed] = {"n": s.n_pairs, "fixed": s.n_better_keep90, "chosen": r.chosen.better_keep90 if r.chosen else None,
                     "lower": s.n_lower_ermse, "keep": s.n_keep90, "acc": s.mean_acc_norm, "ermse": s.mean_ermse_norm,
                     **{f"beat_{c}": getattr(s, f"n_beat_{c}") for c in ("random", "other_rescaled", "meanmap")},
                     **{f"rho_{k}": s.corr.get(k, math.nan) for k in ("proposed", "other_rescaled", "ft_target",
                                                                    "ftx_target")},
                     "rho_signal": s.image.get("signal", math.nan) if s.image else math.nan,
                     "rho_beats_other": s.image.get("beats_other_rescaled", math.nan) if s.image else math.nan}
    n = per[seeds[0]]["n"]

    def row(label, key, fmt="{:d}"):
        vals = [per[s][key] for s in seeds]
        shown = ", ".join("–" if v is None else fmt.format(v) for v in vals)
        return f"| {label} | {_msd(vals)} | {shown} |"

    return ["| over the pairs (of " + str(n) + f") | mean ± sd over {over} | per {over[:-1]} |", "| --- | --- | --- |",
            row("E-RMSE < θ_ftᵀ's with ≥ 90 % of its accuracy, λ2 = 0.7 (headline)", "fixed"),
            row("the same at the λ2 chosen on val (5 % budget)", "chosen"),
            row("E-RMSE < θ_ftᵀ's (any accuracy), λ2 = 0.7", "lower"),
            row("accuracy ≥ 90 % of θ_ftᵀ's, λ2 = 0.7", "keep"),
            row("E-RMSE below the random direction (same norm)", "beat_random"),
            row("E-RMSE below τ* of another source at ‖τ*ˢ‖", "beat_other_rescaled"),
            row("E-RMSE below the source's mean-φ map", "beat_meanmap"),
            row("ρ̄ > 0 (95 % CI over images)", "rho_signal"),
            row("ρ̄ above τ* of another source at ‖τ*ˢ‖ (paired, 95 %)", "rho_beats_other"),
            row("mean accuracy ÷ θ_ftᵀ's", "acc", "{:.3f}"),
            row("mean E-RMSE ÷ θ_ftᵀ's", "ermse", "{:.3f}"),
            row("mean ρ̄, proposed", "rho_proposed", "{:+.3f}"),
            row("mean ρ̄, τ* of another source at ‖τ*ˢ‖", "rho_other_rescaled", "{:+.3f}"),
            row("mean ρ̄, θ_ftᵀ", "rho_ft_target", "{:+.3f}"),
            row("mean ρ̄, θ_ft*ᵀ (in-domain upper bound)", "rho_ftx_target", "{:+.3f}"), ""]


def _loss_and_card(table: pd.DataFrame, seeds: list[int]) -> list[str]:
    out = []
    for risk, label in (("risk_exact", "exact R"), ("risk_card", "the card's R")):
        rows = predicted_vs_measured(table, risk)
        if not len(rows):
            continue
        cal = calibrate(rows)
        per_seed = [calibrate(rows[rows["seed"] == s])["within"] for s in seeds if (rows["seed"] == s).any()]
        fails = (f"valid up to λ2 = {cal['valid_up_to']:g}, fails from {cal['fails_from']:g}"
                 if cal["fails_from"] is not None else "valid on the whole grid")
        out.append(f"- Loss model λ·gᵀτ + ½λ²R with {label} (g, H on the target's train images; measured on its val "
                   f"images): {cal['within']:.0%} of {cal['n']} pair × λ2 rows within ×1.5 (per seed {_msd(per_seed)}), "
                   f"median measured ÷ predicted {cal['median_ratio']:.2f}, Spearman {cal['spearman']:.2f}; {fails} "
                   f"(≥ 80 % within at every λ2 up to it). Without gᵀτ: {cal['second_order']['within']:.0%} within, "
                   f"median ratio {cal['second_order']['median_ratio']:.2f}.")
    pairs = at_lambda(table, PAPER_LAMBDA2).dropna(subset=["risk_exact"])
    forms = set(pairs["card_form"].dropna().astype(str)) if "card_form" in pairs else set()
    form = forms.pop() if len(forms) == 1 else None  # a table from before the column: the eigenpair card's
    card_label = CARD_LABELS.get(form, CARD_LABELS["eig"])
    for col, label in (("risk_card", card_label), ("risk_diag", "Hutchinson diagonal")):
        if col in pairs and pairs[col].notna().any():
            a = agreement(pairs[col], pairs["risk_exact"])
            cal = fit_card_scale(pairs, None, col, form)
            held = (f"; one scale fitted on the other targets' pairs (`diag.decide.card_scale`, what `rank-sources "
                    f"--card --study` applies) puts {cal.loto_within:.0%} within ×1.5 (scale on all pairs "
                    f"{cal.scale:.3g}, log-ratio sd {cal.log_sd:.2f})" if cal else "")
            out.append(f"- Card fidelity, {label}: R_exact ÷ R_card median {a['median_ratio']:.2f}, {a['within']:.0%} "
                       f"of {a['n']} (pair, seed) within ×1.5, Spearman with R_exact {a['spearman']:.2f}{held}.")
    return out + [""] if out else []


def _coverage(table: pd.DataFrame) -> list[str]:
    cov, _ = loto_coverage(table, tier=2)
    out = ["| quantity (80 % jackknife+ intervals, leave one target out) | coverage [95 % Wilson] | per seed | "
           "bias predicted − measured |", "| --- | --- | --- | --- |"]
    for c in cov:
        out.append(f"| {QUANTITY_NAMES.get(c.quantity, c.quantity)} | {c.coverage:.2f} [{c.ci[0]:.2f}, {c.ci[1]:.2f}] "
                   f"(n = {c.n}) | {', '.join(f'{v:.2f}' for v in c.per_seed.values())} | {c.bias:+.3f} ± "
                   f"{c.bias_se:.3f} |")
    return out + [""]


def _screen(table: pd.DataFrame) -> list[str]:
    out, grid = [], []
    for c in validate_screen(table, every_lambda=True)[0]:
        if c.kind == "plain" and c.lambda2 != PAPER_LAMBDA2:
            grid.append(c)
            continue
        what = "eq. 8 at λ2 = 0.7" if c.kind == "plain" else "eq. 8 at the λ2 chosen on val"
        conf = "; ".join(f"{v} {c.confusion[v]['success']}/{c.confusion[v]['failure']}" for v in c.confusion)
        prec = ("no go verdict" if not math.isfinite(c.go_precision) else
                f"precision of go {c.go_precision:.2f} [{c.go_precision_ci[0]:.2f}, {c.go_precision_ci[1]:.2f}]")
        rec = ("no failure" if not math.isfinite(c.nogo_recall) else
               f"recall of no-go {c.nogo_recall:.2f} [{c.nogo_recall_ci[0]:.2f}, {c.nogo_recall_ci[1]:.2f}]")
        out.append(f"- Screen, {what} ({c.n} held-out pairs over {c.n_seeds} seeds; verdict success/failure on test: "
                   f"{conf}): {prec}, {rec}.")
    if grid:
        per = [f"{c.lambda2:g}: " + ("no go" if not math.isfinite(c.go_precision) else
                                     f"{c.confusion['go']['success']}/{c.confusion['go']['failure']}, "
                                     f"{c.go_precision:.2f} [{c.go_precision_ci[0]:.2f}, {c.go_precision_ci[1]:.2f}]")
               for c in grid]
        out.append("- Screen, eq. 8 at the other λ2 of the grid (what `diag screen --lambda2 λ` says: the val drop at "
                   "0.7 scaled by (λ/0.7)²), go verdicts success/failure on test and the precision of go [95 % "
                   f"Wilson], same held-out pairs: λ2 {'; '.join(per)}.")
    return out + [""]


def _ranking(table: pd.DataFrame, seeds: list[int]) -> list[str]:
    at07 = at_lambda(table, PAPER_LAMBDA2)
    ceiling = ranking_ceiling(at07)
    per: dict[str, list[float]] = {}
    for seed in seeds:
        for r in evaluate_rankers(at07[at07["seed"] == seed], n_boot=N_BOOT, every_seed=at07):
            per.setdefault(r["name"], []).append(r["mean_spearman"])
    out = [ceiling.sentence() + "." if ceiling else "No test-retest ceiling (one seed)."]
    best = max((k for k in per if k != ORACLE), key=lambda k: np.mean(per[k]))
    for name, vals in per.items():
        frac = f", {np.mean(vals) / ceiling.mean:.2f} of the ceiling" if ceiling and ceiling.mean > 0 else ""
        note = (" (best)" if name == best else
                " (a reference, not a ranker: it needs the target's explanation vector)" if name == ORACLE else "")
        out.append(f"- {name}: leave-one-target-out Spearman {_msd(vals)} over seeds{frac}{note}")
    return out + [""]


def seeds_block(folder: Path, table: pd.DataFrame, variant: str, seeds: list[int], provenance: str = "") -> list[str]:
    """The Markdown lines of one variant of ``folder`` over its training seeds (``provenance``: one phrase)."""
    table = of_method(table)
    grid = sorted({float(v) for v in table["lambda2"]})
    head = [f"**`results/{folder.name}`** — variant `{variant}`, training seeds {', '.join(map(str, seeds))}, λ2 grid "
            f"{grid[0]:g}–{grid[-1]:g} ({provenance or 'provenance: none recorded'}). The seeds vary the fine-tunes' batch order and Kernel SHAP's coalitions; "
            "θ_base, the splits and val are seed 0's for every seed, so ± covers training noise only.", ""]
    return (head + _headline(table, seeds) + ["**Predictions** (test split scored; every choice on val):", ""]
            + _loss_and_card(table, seeds) + _coverage(table) + _screen(table) + ["**Ranking**:", ""]
            + _ranking(table, seeds))


def loss_model_block(path: Path, provenance: str = "") -> list[str]:
    """``scripts/loss_model_check.py``'s table: the loss model with g and H on train vs on held-out (val) images."""
    table = read_checked_csv(path)
    seeds = sorted(int(s) for s in table["seed"].unique())
    out = [f"**`results/{path.parent.name}/{path.name}`** — the loss model λ·gᵀτ + ½λ²R on every pair of seeds "
           f"{', '.join(map(str, seeds))}, the loss change measured on the target's test images at λ = "
           f"{', '.join(f'{v:g}' for v in sorted(table['lambda2'].unique()))} (`scripts/loss_model_check.py`"
           f"{'; ' + provenance if provenance else ''}):", ""]
    for est, what in (("train", "the target's train images (θ_ftᵀ was fine-tuned on them; the study's Hᵀ)"),
                      ("val", "the target's val images (held out from fine-tuning)")):
        part = table[table["estimate"] == est]
        if not len(part):
            continue
        cal = calibrate(part)
        per = ", ".join(f"λ {p['lambda2']:g}: {p['within']:.0%}" for p in cal["per_lambda"])
        valid = ("valid on the whole grid" if cal["fails_from"] is None else
                 f"valid up to λ = {cal['valid_up_to']:g}" if cal["valid_up_to"] > 0 else
                 f"not valid at any λ of the grid (fails from {cal['fails_from']:g})")
        so = cal["second_order"]
        per_so = ", ".join(f"λ {lam:g}: {agreement(g['predicted_second_order'], g['measured'])['within']:.0%}"
                           for lam, g in part.groupby("lambda2"))
        if cal["criterion"] == "consistent":  # per λ then reads: within ×1.5 or 1.96 se of the measurement
            per = ", ".join(f"λ {p['lambda2']:g}: {p['consistent']:.0%}" for p in cal["per_lambda"])
            ref = agreement(part["measured_on_estimate"], part["measured"], measured_se=part["measured_se"])
            out.append(f"- g and H on {what}: {cal['consistent']:.0%} of {cal['n']} pair × λ rows within ×1.5 or "
                       f"1.96 se of the measured change (per λ: {per}); {valid}. ½λ²R alone "
                       f"{so['consistent']:.0%}, gᵀτ kept only where |gᵀτ| ≥ 2 se {cal['gated']['consistent']:.0%}. "
                       f"Strictly within ×1.5: {cal['within']:.0%} (½λ²R alone {so['within']:.0%}); median measured ÷ "
                       f"predicted {cal['median_ratio']:.2f} (½λ²R alone {so['median_ratio']:.2f}), Spearman "
                       f"{cal['spearman']:.2f}. Reference, the change itself measured on these images: "
                       f"{ref['consistent']:.0%} (strictly {ref['within']:.0%}). Control, the prediction 'no change' "
                       f"(0): {cal['zero']:.0%} (per λ: "
                       + ", ".join(f"λ {p['lambda2']:g}: {p['zero']:.0%}" for p in cal["per_lambda"])
                       + ("): the measurement tells a model from it only from λ = "
                          f"{cal['decides_from']:g} on." if cal["decides_from"] is not None else ")."))
            logit = logit_model_agreement(part)
            if logit is not None:
                own = agreement(part["predicted_logit"], part["measured_on_estimate"])
                quad_own = agreement(part["predicted"], part["measured_on_estimate"])
                by_lam = {p["lambda2"]: p for p in logit["per_lambda"]}
                refs = {lam: agreement(g["measured_on_estimate"], g["measured"], measured_se=g["measured_se"])
                        for lam, g in part.groupby("lambda2")}
                out.append(
                    f"  - The logit-space model (the logits' second-order expansion along τ under the exact "
                    f"cross-entropy), on the same images: on the images it was estimated on it is within ×1.5 of "
                    f"their own change on {own['within']:.0%} of rows (λ·gᵀτ + ½λ²R: {quad_own['within']:.0%}; per λ "
                    + ", ".join(f"{lam:g}: {agreement(g['predicted_logit'], g['measured_on_estimate'])['within']:.0%}"
                                f" vs {agreement(g['predicted'], g['measured_on_estimate'])['within']:.0%}"
                                for lam, g in part.groupby("lambda2"))
                    + f"). On the test images: {logit['consistent']:.0%} consistent (per λ: "
                    + ", ".join(f"{lam:g}: {p['consistent']:.0%}" for lam, p in by_lam.items())
                    + f"); in the range it declares valid on its own images ({logit['declared_share']:.0%} of rows) "
                    f"{logit['declared']['consistent']:.0%}. The ceiling of any predictor from these images, their "
                    "own measured change scored the same way, per λ: "
                    + ", ".join(f"{lam:g}: {r['consistent']:.0%}" for lam, r in refs.items()) + ".")
            continue
        out.append(f"- g and H on {what}: measured ÷ predicted median {cal['median_ratio']:.2f}, "
                   f"{cal['within']:.0%} of {cal['n']} pair × λ rows within ×1.5 (per λ: {per}), Spearman "
                   f"{cal['spearman']:.2f}; {valid}. Without the first-order term (½λ²R alone): median "
                   f"{so['median_ratio']:.2f}, {so['within']:.0%} within ×1.5 (per λ: {per_so}), Spearman "
                   f"{so['spearman']:.2f}.")
    rt = retest(table[table["estimate"] == "train"])
    if rt:
        out.append("- The measurement against itself: the change on one half of the test images is within ×1.5 of "
                   f"the other half's in {rt['within']:.0%} of rows ("
                   + ", ".join(f"λ {lam:g}: {v:.0%}" for lam, v in rt["per_lambda"].items())
                   + "); median paired se ÷ |measured change| "
                   + ", ".join(f"λ {lam:g}: {v:.2f}" for lam, v in (table["measured_se"] / table["measured"].abs())
                               .groupby(table["lambda2"]).median().items())
                   + ". No prediction can be held to ×1.5 more often than the measurement holds to itself: "
                   "the criterion that counts is within ×1.5 or within the measurement's noise.")
    neg = table[table["estimate"] == "train"].groupby("lambda2")["measured"].apply(lambda m: float((m < 0).mean()))
    out.append("- The measured loss change is negative (adding λτ*ˢ lowers the target's test loss) in "
               + ", ".join(f"{v:.0%} at λ {lam:g}" for lam, v in neg.items()) + " of the pairs: no model with a "
               "gradient estimated near zero can predict those.")
    both = table.pivot_table(index=["seed", "source", "target"], columns="estimate", values="risk", aggfunc="first")
    if {"train", "val"} <= set(both.columns):
        r = (both["val"] / both["train"]).to_numpy(float)
        out.append(f"- R on held-out images ÷ R on the training images: median {np.median(r):.1f} "
                   f"(quartiles {np.quantile(r, 0.25):.1f}–{np.quantile(r, 0.75):.1f}) over {len(r)} (pair, seed).")
    return out + [""]


def outside_block(path: Path) -> list[str]:
    """``scripts/outside_domains.py``'s table: the ranking's intervals on domains outside the study."""
    table = read_checked_csv(path)
    doms = sorted(table["target"].unique())
    out = [f"**`results/{path.parent.name}/{path.name}`** — the ranking's {table['level'].iloc[0]:.0%} intervals on "
           f"{len(doms)} domain(s) outside the study ({', '.join(doms)}: transformed suite images in an ImageFolder, "
           "given with `--data`; `scripts/outside_domains.py`):", ""]
    for q, g in table.groupby("quantity"):
        k, n = int(g["inside"].sum()), len(g)
        lo, hi = wilson_interval(k, n)
        err = (g["predicted"] - g["measured"]).to_numpy(float)
        out.append(f"- {QUANTITY_NAMES.get(q, q)}: coverage {k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}], bias "
                   f"{err.mean():+.3f} ± {err.std(ddof=1) / math.sqrt(n):.3f}.")
    return out + [""]


def full_seeds_block(path: Path, provenance: str = "") -> list[str]:
    """``scripts/full_seeds.py``'s table: one λ2 = 0.7 study per full seed (θ_base and the splits reseeded)."""
    table = of_method(read_checked_csv(path))
    fulls = sorted(int(s) for s in table["full_seed"].unique())
    head = [f"**`results/{path.parent.name}/{path.name}`** — the full-seed axis: θ_base (initialisation and "
            "pretraining, `$TVDIAG_BASE_SEED`) and the splits (the val carve, `$TVDIAG_SPLIT_SEED`) reseeded "
            f"together, full seeds {', '.join(map(str, fulls))}, training seed 0 in each, λ2 = {PAPER_LAMBDA2:g} "
            f"(`scripts/full_seeds.py`; {provenance or 'provenance: none recorded'}). Its ± covers θ_base, the "
            "splits and training together; the test split is the suite's own in every full seed.", ""]
    by_full = table.assign(seed=table["full_seed"])
    ceiling = ranking_ceiling(by_full)
    tail = [] if ceiling is None else [
        "Ranking across full seeds: the " + ceiling.sentence().replace("training seeds", "full seeds")
        + ". The best data-free ranker, the source record, leave one target out per full seed: Spearman "
        + _msd([evaluate_loto(part, tier_features(part, 0), target="ermse", predictors={RECORD: "record"},
                              n_boot=N_BOOT, fit_target="ermse_norm")[0].mean_spearman
                for part in (by_full[by_full["seed"] == f] for f in fulls)]) + ".", ""]
    return head + _headline(by_full, fulls, over="full seeds") + tail
