"""The method study report: a study with several transfer methods, and its trade-off frame.

A study run with ``--methods`` holds, per (pair, λ2, seed), one row per method (column
``method``; :mod:`diag.study.run`). Every method row carries the pair's θ_ftᵀ scores, plain eq. 8
at the same λ2 (``*_plain``) and the mean-φ-map control of the source (``*_meanmap``); every
choice inside a method (k, c, budget, mixture, λ2 of a mix) was made on the target's ``val``
split, and the numbers below are the ``test`` scores. Per method and seed (then mean ± sd
over seeds), :func:`method_report` counts

(a) ``keeps``: pairs (targets, for a mix) keeping ≥ ``keep`` (95 %) of θ_ftᵀ's accuracy while keeping ≥ ``kept_gain``
    (80 %) of plain eq. 8's E-RMSE reduction at the same λ2, i.e. with g = E-RMSE(θ_ftᵀ) − E-RMSE,
    g_method ≥ 0.8·g_plain; where plain does not reduce E-RMSE (g_plain ≤ 0) there is no reduction
    to keep and the pair counts when g_method ≥ 0 (``n_plain_reduces`` says how many pairs that is);
(b) ``beats_prior``: pairs whose E-RMSE is below the source's mean-φ map's (a constant prior) *and*
    whose maps carry image-specific signal: ρ̄, the mean per-image correlation of the centred map
    with the centred φ, has a 95 % CI over images above 0 (:func:`diag.study.summary.ci_above_zero`; a constant prior's ρ̄ is 0; θ_ft*ᵀ's is
    ≈ 0.44 on the mini-suite). The image-specific E-RMSE it replaces, √(2 − 2ρ̄) against the prior's
    1, only a model with ρ̄ > 0.5 could beat — not even θ_ft*ᵀ;
(c) the mixes vs the ranker's single source: per target, the universal vector (``mix`` rows,
    the uniform mix of every other domain's τ*, which does not depend on the source), the
    ranker-weighted mix (``mix-ranked`` rows, Σ wₛτ*ˢ with wₛ ∝ the ranker's positive predicted
    gain), the universal vector at the single source's step (``mix-matched`` rows: ‖λ·mix‖ =
    ‖λ2·τ*ˢ‖, :func:`diag.transfer.methods.matched_scale`) and the ranker-weighted mix at that step
    (``mix-ranked-matched``: the two mixes at one step differ in their weights alone) against plain eq. 8 from the source the
    ranker picks for that target (the predictor ``rank-sources`` ranks with, the sources' record by
    default, fitted on the pairs without the target at every training seed of the table; the
    cos(τ_ftˢ, τ_ftᵀ) proxy when fewer than 4 such pairs exist): targets
    where each mix's E-RMSE is lower (with a Wilson interval), which wins, and the mean E-RMSE and
    accuracy difference mix − source over targets with its standard error;
(d) the loss model: the measured val cross-entropy increase over θ_ftᵀ against the
    predicted one (method rows: the chosen vector's ½λ²R; plain rows: the loss model
    λ2·gᵀτ*ˢ + ½λ2²·R(τ*ˢ) of :func:`diag.curvature.risk.loss_model`, exact risk when present,
    else card, else diagonal; ½λ2²R where the study stored no gᵀτ): median ratio measured ÷ predicted, the share of
    rows where it lies within [½, 2] ("holds"), and the median ratio in the lower and upper half
    of the predicted increase (where it holds).

A mix is one vector per target (``mix-matched``, ``mix-ranked-matched``: its step set by the row's source), so every
count of mix rows — (a), (b), (c) and the rows of (d) — reads one row per target: the row of the
ranker's source (:func:`per_target`), whose plain eq. 8 and mean-φ map are its baseline. The
denominators say so ("of 7 targets"; ``n_targets`` instead of ``n_pairs``).

:func:`pareto_front` marks the non-dominated points of normalised accuracy (up) against
normalised E-RMSE (down); :func:`tradeoff_frame` gives the points, one per (method, pair).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diag.constants import PAPER_LAMBDA2
from diag.curvature.risk import loss_model
from diag.decide.recommend import ranker_gains
from diag.study.summary import ci_above_zero, mean_sd
from diag.stats.proportion import wilson_interval
from diag.transfer.methods import METHODS, MIX_METHODS
from diag.table import add_normalised, at_lambda, PLAIN, with_run_columns
from train.errors import DataError

#: Accuracy kept (÷ θ_ftᵀ) and share of plain's E-RMSE reduction kept of goal (a).
KEEP = 0.95
KEPT_GAIN = 0.8
#: The quadratic model "holds" on a row when measured ÷ predicted lies in [1/HOLDS, HOLDS].
HOLDS = 2.0
#: The counts of (a) and (b); a mix's are over targets (``n_targets`` instead of ``n_pairs``).
COUNTS = ("n_pairs", "keeps", "n_plain_reduces", "beats_prior")
#: (c)'s contenders: the method rows compared with the ranker's single source, and their labels.
MIXES = {"mix": "universal", "mix-ranked": "ranked", "mix-matched": "matched", "mix-ranked-matched": "ranked_matched"}


def pareto_front(df: pd.DataFrame, x: str = "ermse_norm", y: str = "acc_norm") -> pd.Series:
    """Boolean mask of the rows on the Pareto front of minimising ``x`` while maximising ``y``.

    A row is dominated when another row has x ≤ its x and y ≥ its y with at least one strict;
    rows with a NaN coordinate are never on the front. Exact ties are all kept.
    """
    pts = df[[x, y]].to_numpy(dtype=np.float64)
    ok = np.isfinite(pts).all(axis=1)
    front = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        others = pts[ok]
        dominated = ((others[:, 0] <= pts[i, 0]) & (others[:, 1] >= pts[i, 1])
                     & ((others[:, 0] < pts[i, 0]) | (others[:, 1] > pts[i, 1]))).any()
        front[i] = not dominated
    return pd.Series(front, index=df.index, name="pareto")


def tradeoff_frame(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2) -> pd.DataFrame:
    """One point per (method, pair, seed) at ``lambda2``: ``acc_norm``, ``ermse_norm`` and ``pareto``."""
    rows = add_normalised(with_run_columns(at_lambda(df, lambda2) if "lambda2" in df.columns else df))
    out = rows[["method", "source", "target", "seed", "acc_norm", "ermse_norm"]].copy()
    out["pareto"] = pareto_front(out)
    return out.reset_index(drop=True)


def _gain_kept(rows: pd.DataFrame, kept_gain: float) -> tuple[pd.Series, pd.Series]:
    """(E-RMSE reduction kept per row, plain reduces E-RMSE per row) — see (a) of the module doc."""
    gain = rows["ermse_ft_target"] - rows["ermse"]
    plain_ermse = rows["ermse_plain"].fillna(rows["ermse"]) if "ermse_plain" in rows else rows["ermse"]
    plain = rows["ermse_ft_target"] - plain_ermse  # a plain row is its own reference
    reduces = plain > 0
    return gain.where(~reduces, gain - kept_gain * plain) >= -1e-12, reduces


def method_counts(rows: pd.DataFrame, keep: float = KEEP, kept_gain: float = KEPT_GAIN,
                  picks: dict | None = None) -> dict[str, int]:
    """(a) and (b) over the rows of one method and run: one count per pair (``n_pairs``), or per target
    for a mix (``n_targets``: :func:`per_target` with the ranker's ``picks``, the row of its source).

    Raises:
        DataError: mix rows without ``picks`` (counted per pair, one target's mix would count once per source).
    """
    n_key = "n_pairs"
    if len(rows) and set(rows["method"]) <= set(MIX_METHODS):
        if picks is None:
            raise DataError("the rows of a mix count once per target: give the ranker's picks (ranker_picks)")
        rows, n_key = per_target(rows, picks), "n_targets"
    kept_acc = rows["accuracy"] >= keep * rows["accuracy_ft_target"] - 1e-12
    kept, reduces = _gain_kept(rows, kept_gain)
    prior = pd.Series(False, index=rows.index)
    if "ermse_meanmap" in rows.columns:  # tables before corr_img: no signal, never counted
        prior = (rows["ermse"] < rows["ermse_meanmap"]) & ci_above_zero(rows)
    return {n_key: int(len(rows)), "keeps": int((kept_acc & kept).sum()), "n_plain_reduces": int(reduces.sum()),
            "beats_prior": int(prior.sum())}


def ranker_pick(plain: pd.DataFrame, target: str, known: pd.DataFrame | None = None) -> tuple[str, str]:
    """(source the ranker picks for ``target``, how) from the plain rows of one run, never reading the target's pairs.

    The source of largest predicted gain (:func:`diag.decide.recommend.ranker_gains`: the predictor
    ``rank-sources`` ranks with, the sources' record by default, fitted on the pairs without the target —
    of ``known`` when given, e.g. every training seed's, as the study's ranked pass fits it; the
    cos(τ_ftˢ, τ_ftᵀ) proxy when fewer than 4 such pairs exist) — the same ranker whose gains weight
    ``mix-ranked``.
    """

    gains, how = ranker_gains(plain, target, known=known)
    return max(gains, key=gains.get), how  # ties: the first candidate row


def ranker_picks(plain: pd.DataFrame, known: pd.DataFrame | None = None) -> dict[str, tuple[str, str]]:
    """target → :func:`ranker_pick` for every target of one run's plain rows (``known``: the pairs it is fitted on)."""
    return {t: ranker_pick(plain, t, known) for t in sorted(plain["target"].unique())}


def per_target(rows: pd.DataFrame, picks: dict) -> pd.DataFrame:
    """One row per target of one method and run: the row whose source is the ranker's pick for that target.

    A mix does not depend on the source (``mix-matched``: only through the step it is matched to), so
    its rows of one target are one comparison, not one per source; the ranker's source's row holds
    the baseline it is compared with (plain eq. 8, the source's mean-φ map). Targets whose picked
    source has no row here are left out.
    """
    src = rows["target"].map(lambda t: picks.get(t, (None,))[0])
    return rows[rows["source"] == src].drop_duplicates("target").sort_values("target")


def _mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error over the values: sd/√n; NaN for fewer than 2)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()) if v.size else math.nan, float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def universal_vs_ranker(run: pd.DataFrame, picks: dict | None = None) -> dict:
    """(c) on one run at one λ2: per target, the mixes against plain eq. 8 from the ranker's source.

    Contenders: ``universal`` (``mix`` rows), ``ranked`` (``mix-ranked`` rows, weighted by the same
    ranker's gains), ``matched`` (``mix-matched`` rows: the universal vector at the ranker's source's
    step ‖λ2·τ*ˢ‖), ``ranked_matched`` (``mix-ranked-matched`` rows: the ranked mix at that step) and ``source`` (the ranker's top single source; ``picks``: :func:`ranker_picks`, computed
    when not given). Each mix counts once per target (its row of the ranker's source, :func:`per_target`).
    Per target: ``ermse_*``, ``accuracy_*`` and the step ``size_*`` (‖Δθ‖ along the vector added) of each
    contender, and ``winner`` (lowest E-RMSE). Counts over targets: ``<label>_wins`` (lower E-RMSE than the
    source) with ``<label>_wins_ci`` (Wilson 95 %), ``ranked_beats_universal``, ``matched_beats_universal``,
    ``ranked_matched_beats_matched``;
    ``<label>_dermse`` / ``<label>_daccuracy``: (mean, standard error over targets) of mix − source.
    """
    plain = run[run["method"] == PLAIN]
    picks = ranker_picks(plain) if picks is None else picks
    present = {label: per_target(run[run["method"] == m], picks).set_index("target")
               for m, label in MIXES.items() if (run["method"] == m).any()}
    targets = sorted(set(picks).intersection(*(set(d.index) for d in present.values())))
    per = {}
    for target in targets:
        source, how = picks[target]
        ref = plain[(plain["target"] == target) & (plain["source"] == source)].iloc[0]
        v = {"source": source, "how": how, "ermse_source": float(ref["ermse"]),
             "accuracy_source": float(ref["accuracy"]),
             "size_source": float(ref["lambda2"]) * float(ref.get("norm_star_source", math.nan))}
        for label, rows in present.items():
            v[f"ermse_{label}"] = float(rows.at[target, "ermse"])
            v[f"accuracy_{label}"] = float(rows.at[target, "accuracy"])
            v[f"size_{label}"] = float(rows.at[target, "repair_size"]) if "repair_size" in rows else math.nan
        scores = {k.removeprefix("ermse_"): x for k, x in v.items() if k.startswith("ermse_")}
        v["winner"] = min(scores, key=scores.get)
        per[target] = v
    out = {"n_targets": len(per), "per_target": per}
    for label in present:
        wins = sum(v[f"ermse_{label}"] < v["ermse_source"] for v in per.values())
        out[f"{label}_wins"] = wins
        out[f"{label}_wins_ci"] = list(wilson_interval(wins, len(per))) if per else [math.nan, math.nan]
        for what in ("ermse", "accuracy"):
            out[f"{label}_d{what}"] = list(_mean_se([v[f"{what}_{label}"] - v[f"{what}_source"]
                                                     for v in per.values()]))
    for label in ("ranked", "matched"):
        if label in present and "universal" in present:
            out[f"{label}_beats_universal"] = sum(v[f"ermse_{label}"] < v["ermse_universal"] for v in per.values())
    if "ranked_matched" in present and "matched" in present:  # the two mixes at one step: the weights alone differ
        out["ranked_matched_beats_matched"] = sum(v["ermse_ranked_matched"] < v["ermse_matched"] for v in per.values())
    return out


def quadratic_check(rows: pd.DataFrame) -> dict:
    """(d): measured ÷ predicted loss increase over the rows of one method (any runs, one λ2)."""
    measured = pd.to_numeric(rows.get("loss_increase_val", pd.Series(np.nan, index=rows.index)), errors="coerce")
    if not rows["method"].eq(PLAIN).all():
        predicted = pd.to_numeric(rows.get("repair_predicted_loss_increase", pd.Series(np.nan, index=rows.index)),
                                  errors="coerce")
    else:
        risk = pd.Series(np.nan, index=rows.index)
        for col in ("risk_diag", "risk_card", "risk_exact"):  # the best estimate present wins
            if col in rows:
                risk = pd.to_numeric(rows[col], errors="coerce").where(lambda v: v.notna(), risk)
        g = pd.to_numeric(rows["grad_dot_tau"], errors="coerce") if "grad_dot_tau" in rows \
            else pd.Series(np.nan, index=rows.index)
        predicted = pd.Series([loss_model(lam, r, None if math.isnan(gt) else gt)
                               for lam, r, gt in zip(rows["lambda2"].astype(float), risk, g)], index=rows.index)
    ok = measured.notna() & predicted.notna() & (predicted > 0)
    ratio = (measured[ok] / predicted[ok]).astype(float)
    if ratio.empty:
        return {"n": 0, "median_ratio": math.nan, "holds": math.nan, "median_ratio_small": math.nan,
                "median_ratio_large": math.nan}
    small = predicted[ok] <= predicted[ok].median()
    return {"n": int(len(ratio)), "median_ratio": float(ratio.median()),
            "holds": float(((ratio >= (1 - 1e-9) / HOLDS) & (ratio <= HOLDS * (1 + 1e-9))).mean()),
            "median_ratio_small": float(ratio[small].median()),
            "median_ratio_large": float(ratio[~small].median()) if (~small).any() else math.nan}


@dataclass(frozen=True)
class MethodReport:
    """The method study's counts per method: ``per_seed[method][seed]`` and ``mean_sd[method][count]`` = (mean, sd).

    A mix's counts are over targets (``n_targets``), every other method's over pairs (``n_pairs``);
    ``universal`` holds (c) per seed (:func:`universal_vs_ranker`), ``quadratic`` (d) per method.
    """
    lambda2: float
    keep: float
    kept_gain: float
    per_seed: dict
    mean_sd: dict
    universal: dict
    quadratic: dict

    def to_dict(self) -> dict:
        return {"lambda2": self.lambda2, "keep": self.keep, "kept_gain": self.kept_gain, "per_seed": self.per_seed,
                "mean_sd": {m: {k: list(v) for k, v in d.items()} for m, d in self.mean_sd.items()},
                "universal_vs_ranker": self.universal, "quadratic_model": self.quadratic}

    def table(self) -> str:
        def ms(m, s, p=1):
            return f"{m:.{p}f} ± " + (f"{s:.{p}f}" if s == s else "— (one seed)")

        n = {m: next(f"{v[0]:.0f} {k.removeprefix('n_')}" for k, v in d.items() if k in ("n_pairs", "n_targets"))
             for m, d in self.mean_sd.items()}
        out = [f"method study at λ2 = {self.lambda2:g} (test split; every choice on val), mean ± sd over seeds",
               f"  (a) keeps ≥ {self.keep:.0%} of θ_ftᵀ's accuracy and ≥ {self.kept_gain:.0%} of plain eq. 8's "
               "E-RMSE reduction; (b) E-RMSE below the source's mean-φ map and ρ̄ > 0 (95 % CI over images)",
               "  (a), (b) of a mix: once per target, against the ranker's source (a mix is one vector per target)",
               f"  {'method':14s} {'counted over':>13s} {'(a) keeps':>16s} {'plain reduces':>16s} "
               f"{'(b) beats prior':>16s}"]
        for m, d in self.mean_sd.items():
            out.append(f"  {m:14s} {n[m]:>13s} {ms(*d['keeps']):>16s} {ms(*d['n_plain_reduces']):>16s} "
                       f"{ms(*d['beats_prior']):>16s}")
        out += self._mix_lines(ms)
        out.append("  (d) measured val loss increase ÷ predicted (plain: λ·gᵀτ + ½λ²R; methods: ½λ²R): median "
                   "(within [½, 2]; small / large predicted)")
        for m, q in self.quadratic.items():
            if q["n"]:
                out.append(f"      {m:14s} {q['median_ratio']:.3g} ({q['holds']:.0%} of {q['n']} rows; "
                           f"{q['median_ratio_small']:.3g} / {q['median_ratio_large']:.3g})")
            else:
                out.append(f"      {m:14s} — (no predicted ½λ²R: no curvature for this method's rows)")
        return "\n".join(out)

    def _mix_lines(self, ms) -> list[str]:
        """(c): wins of each mix over the ranker's source (mean ± sd over seeds; Wilson 95 % of one seed), and
        per seed the mean E-RMSE and accuracy difference mix − source ± its standard error over targets."""
        if not self.universal:
            return []
        runs = list(self.universal.values())
        how = sorted({v["how"] for u in runs for v in u["per_target"].values()})
        out = []
        for key, text in (("universal_wins", "universal vector beats the ranker's single source"),
                          ("ranked_wins", "ranker-weighted mix beats the ranker's single source"),
                          ("matched_wins", "universal vector at that source's step ‖λ2·τ*ˢ‖ beats it"),
                          ("ranked_matched_wins", "ranker-weighted mix at that source's step beats it"),
                          ("ranked_beats_universal", "ranker-weighted mix beats the universal vector"),
                          ("matched_beats_universal", "universal vector at the source's step beats it at its "
                                                      "val-chosen λ2"),
                          ("ranked_matched_beats_matched", "at the source's step, the ranker-weighted mix beats the "
                                                           "universal vector")):
            if key in runs[0]:
                ci = (f"; 95 % {runs[0][key + '_ci'][0]:.2f}–{runs[0][key + '_ci'][1]:.2f} as a share"
                      if len(runs) == 1 and key + "_ci" in runs[0] else "")
                out.append(f"  (c) {text} ({', '.join(how)}) on {ms(*mean_sd([u[key] for u in runs]))} "
                           f"of {runs[0]['n_targets']} targets{ci}")
        for label in MIXES.values():
            if f"{label}_dermse" in runs[0]:
                per = "; ".join(f"seed {seed}: {u[f'{label}_dermse'][0]:+.3f} ± {u[f'{label}_dermse'][1]:.3f} / "
                                f"{u[f'{label}_daccuracy'][0]:+.3f} ± {u[f'{label}_daccuracy'][1]:.3f}"
                                for seed, u in self.universal.items())
                out.append(f"      {label} − source, E-RMSE / accuracy (mean ± se over {runs[0]['n_targets']} "
                           f"targets): {per}")
        return out


def method_report(df: pd.DataFrame, lambda2: float = PAPER_LAMBDA2, keep: float = KEEP,
                  kept_gain: float = KEPT_GAIN, variant: str | None = None) -> MethodReport:
    """:class:`MethodReport` of a study table with a ``method`` column, at one λ2 and one θ_ft* variant.

    Raises:
        DataError: no rows at ``lambda2``, or a variant the table does not hold.
    """
    rows = add_normalised(with_run_columns(at_lambda(df, lambda2)))
    variants = sorted(rows["variant"].unique())
    variant = variant or ("paper" if "paper" in variants else variants[0])
    if variant not in variants:
        raise DataError(f"the study has no variant '{variant}'; it has {variants}")
    rows = rows[rows["variant"] == variant]
    methods = [m for m in METHODS if m in set(rows["method"])]
    methods += sorted(set(rows["method"]) - set(methods))
    per_seed: dict = {m: {} for m in methods}
    universal: dict = {}
    mixes = [m for m in methods if m in MIX_METHODS]
    once: dict = {m: [] for m in mixes}  # a mix's rows, one per target and run (:func:`per_target`)
    every_seed = rows[rows["method"] == PLAIN]  # the ranker learns every run's pairs, as the study's ranked pass does
    for seed, run in rows.groupby("seed", sort=True):
        picks = ranker_picks(run[run["method"] == PLAIN], every_seed) if mixes else None
        for m in methods:
            per_seed[m][int(seed)] = method_counts(run[run["method"] == m], keep, kept_gain, picks)
        for m in mixes:
            once[m].append(per_target(run[run["method"] == m], picks))
        if any(m in methods for m in MIXES):
            universal[int(seed)] = universal_vs_ranker(run, picks)
    over_seeds = {m: {k: mean_sd([c[k] for c in per_seed[m].values()]) for k in next(iter(per_seed[m].values()))}
                  for m in methods}
    quadratic = {m: quadratic_check(pd.concat(once[m]) if m in once else rows[rows["method"] == m]) for m in methods}
    return MethodReport(float(lambda2), keep, kept_gain, per_seed, over_seeds, universal, quadratic)
