"""The issue-10 report of a study with several transfer methods, and its trade-off frame.

A study run with ``--methods`` holds, per (pair, λ2, seed), one row per method (column
``method``; :mod:`diag.sweep`). Every method row carries the pair's θ_ftᵀ scores, plain eq. 8
at the same λ2 (``*_plain``) and the mean-φ-map control of the source (``*_meanmap``); every
choice inside a method (k, c, budget, mixture, λ2 of a mix) was made on the target's ``val``
split, and the numbers below are the ``test`` scores. Per method and seed (then mean ± sd
over seeds), :func:`method_report` counts

(a) ``keeps``: pairs keeping ≥ ``keep`` (95 %) of θ_ftᵀ's accuracy while keeping ≥ ``kept_gain``
    (80 %) of plain eq. 8's E-RMSE reduction at the same λ2, i.e. with g = E-RMSE(θ_ftᵀ) − E-RMSE,
    g_method ≥ 0.8·g_plain; where plain does not reduce E-RMSE (g_plain ≤ 0) there is no reduction
    to keep and the pair counts when g_method ≥ 0 (``n_plain_reduces`` says how many pairs that is);
(b) ``beats_prior``: pairs whose E-RMSE *and* image-specific E-RMSE are below the source's
    mean-φ map's (a constant prior; its image-specific E-RMSE is 1);
(c) ``universal`` vs the ranker's single source: per target, the universal vector (``mix`` rows,
    the uniform mix of every other domain's τ*, which does not depend on the source) against
    plain eq. 8 from the source the ranker picks for that target (a ridge predictor on the
    tier-0 features fitted on the pairs without the target; the cos(τ_ftˢ, τ_ftᵀ) proxy when
    fewer than 4 such pairs exist): targets where the universal E-RMSE is lower;
(d) the quadratic model: the measured val cross-entropy increase over θ_ftᵀ against the
    predicted ½λ²R (method rows: the chosen vector's; plain rows: ½λ2²·R(τ*ˢ), exact risk
    when present, else card, else diagonal): median ratio measured ÷ predicted, the share of
    rows where it lies within [½, 2] ("holds"), and the median ratio in the lower and upper half
    of the predicted increase (where it holds).

:func:`pareto_front` marks the non-dominated points of normalised accuracy (up) against
normalised E-RMSE (down); :func:`tradeoff_frame` gives the points, one per (method, pair).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diag.constants import PAPER_LAMBDA2
from diag.pairs import PLAIN, add_normalised, at_lambda, with_run_columns
from diag.summary import _mean_sd
from train.errors import DataError

#: Accuracy kept (÷ θ_ftᵀ) and share of plain's E-RMSE reduction kept of goal (a).
KEEP = 0.95
KEPT_GAIN = 0.8
#: The quadratic model "holds" on a row when measured ÷ predicted lies in [1/HOLDS, HOLDS].
HOLDS = 2.0
COUNTS = ("n_pairs", "keeps", "n_plain_reduces", "beats_prior")


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


def method_counts(rows: pd.DataFrame, keep: float = KEEP, kept_gain: float = KEPT_GAIN) -> dict[str, int]:
    """(a) and (b) over the rows of one method and run (one row per pair)."""
    kept_acc = rows["accuracy"] >= keep * rows["accuracy_ft_target"] - 1e-12
    kept, reduces = _gain_kept(rows, kept_gain)
    prior = pd.Series(False, index=rows.index)
    if {"ermse_meanmap", "ermse_img_meanmap"} <= set(rows.columns):
        prior = (rows["ermse"] < rows["ermse_meanmap"]) & (rows["ermse_img"] < rows["ermse_img_meanmap"])
    return {"n_pairs": int(len(rows)), "keeps": int((kept_acc & kept).sum()), "n_plain_reduces": int(reduces.sum()),
            "beats_prior": int(prior.sum())}


def ranker_pick(plain: pd.DataFrame, target: str) -> tuple[str, str]:
    """(source the ranker picks for ``target``, how) from the plain rows of one run, never reading the target's pairs.

    Ridge on the tier-0 features (:func:`diag.predictor.tier_features`) fitted on pairs without
    the target, predicting normalised E-RMSE; with fewer than 4 such pairs the largest
    cos(τ_ftˢ, τ_ftᵀ) (the paper's proxy).
    """
    from diag.predictor import fit_predictor, tier_features

    cands = plain[plain["target"] == target]
    train = plain[(plain["target"] != target) & (plain["source"] != target)]
    feats = [f for f in tier_features(train, 0) if f in cands.columns] if len(train) >= 4 else []
    if feats:
        pred = fit_predictor(train, feats, "ermse_norm", "ridge").predict(cands)
        return str(cands["source"].iloc[int(np.nanargmin(pred))]), "ridge (tier 0)"
    if "cos_ft" not in cands.columns:
        raise DataError("the ranker needs the 'cos_ft' column of the study table")
    return str(cands.sort_values("cos_ft", ascending=False, kind="stable")["source"].iloc[0]), "cos_ft proxy"


def universal_vs_ranker(run: pd.DataFrame) -> dict:
    """(c) on one run at one λ2: per target the universal mix's E-RMSE against the ranker's source's."""
    plain, mixed = run[run["method"] == PLAIN], run[run["method"] == "mix"]
    per = {}
    for target in sorted(set(mixed["target"]) & set(plain["target"])):
        source, how = ranker_pick(plain, target)
        single = float(plain[(plain["target"] == target) & (plain["source"] == source)]["ermse"].iloc[0])
        universal = float(mixed[mixed["target"] == target]["ermse"].mean())
        per[target] = {"source": source, "how": how, "ermse_source": single, "ermse_universal": universal}
    return {"n_targets": len(per), "universal_wins": sum(v["ermse_universal"] < v["ermse_source"] for v in per.values()),
            "per_target": per}


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
        predicted = 0.5 * rows["lambda2"] ** 2 * risk
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
    """Issue-10 counts per method: ``per_seed[method][seed]`` and ``mean_sd[method][count]`` = (mean, sd)."""

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

        n = {m: self.mean_sd[m]["n_pairs"][0] for m in self.mean_sd}
        out = [f"issue 10 at λ2 = {self.lambda2:g} (test split; every choice on val), mean ± sd over seeds",
               f"  (a) keeps ≥ {self.keep:.0%} of θ_ftᵀ's accuracy and ≥ {self.kept_gain:.0%} of plain eq. 8's "
               "E-RMSE reduction; (b) E-RMSE and image-specific E-RMSE below the source's mean-φ map",
               f"  {'method':14s} {'pairs':>6s} {'(a) keeps':>16s} {'plain reduces':>16s} {'(b) beats prior':>16s}"]
        for m, d in self.mean_sd.items():
            out.append(f"  {m:14s} {n[m]:6.0f} {ms(*d['keeps']):>16s} {ms(*d['n_plain_reduces']):>16s} "
                       f"{ms(*d['beats_prior']):>16s}")
        if self.universal:
            wins = [u["universal_wins"] for u in self.universal.values()]
            tot = [u["n_targets"] for u in self.universal.values()]
            how = sorted({v["how"] for u in self.universal.values() for v in u["per_target"].values()})
            out.append(f"  (c) universal vector beats the ranker's single source ({', '.join(how)}) on "
                       f"{ms(*_mean_sd(wins))} of {tot[0]} targets")
        out.append("  (d) measured val loss increase ÷ predicted ½λ²R: median (within [½, 2]; small / large predicted)")
        for m, q in self.quadratic.items():
            if q["n"]:
                out.append(f"      {m:14s} {q['median_ratio']:.3g} ({q['holds']:.0%} of {q['n']} rows; "
                           f"{q['median_ratio_small']:.3g} / {q['median_ratio_large']:.3g})")
            else:
                out.append(f"      {m:14s} — (no predicted ½λ²R: no curvature for this method's rows)")
        return "\n".join(out)


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
    methods = [m for m in ("plain", "project", "precondition", "blocks", "mix") if m in set(rows["method"])]
    methods += sorted(set(rows["method"]) - set(methods))
    per_seed: dict = {m: {} for m in methods}
    universal: dict = {}
    for seed, run in rows.groupby("seed", sort=True):
        for m in methods:
            per_seed[m][int(seed)] = method_counts(run[run["method"] == m], keep, kept_gain)
        if "mix" in methods:
            universal[int(seed)] = universal_vs_ranker(run)
    mean_sd = {m: {k: _mean_sd([c[k] for c in per_seed[m].values()]) for k in COUNTS} for m in methods}
    quadratic = {m: quadratic_check(rows[rows["method"] == m]) for m in methods}
    return MethodReport(float(lambda2), keep, kept_gain, per_seed, mean_sd, universal, quadratic)
