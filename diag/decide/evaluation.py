"""Leave-one-target-out evaluation of source rankers (the study's ranking report, ``diag bench``).

For each target T: fit on the pairs that involve T neither as target nor (by default) as source,
predict T's pairs, and score the ranking against the measured outcome: Spearman, top-1 regret,
each with a bootstrap interval over targets (:func:`evaluate_loto`, :func:`evaluate_rankers`); and
the coverage and bias of the prediction intervals (:func:`loto_coverage`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from diag.constants import PAPER_LAMBDA2, PREDICTION_LEVEL
from diag.decide.predictor import (MODELS, QUANTITIES, RANKER, PredictorWarning, fit_pair_predictor, fit_predictor,
                                   target_values, tier_features)
from diag.decide.record import MIN_TRAINING_PAIRS, training_pairs
from diag.stats import pair_bootstrap_ci, pearson, wilson_interval, with_normalised
from diag.stats.correlation import rankdata
from diag.table import lam_key, with_run_columns
from train.errors import DataError, unknown

log = logging.getLogger(__name__)


def _rank_corr(pred: np.ndarray, actual: np.ndarray) -> float:
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(actual) == 0:
        return float("nan")
    a, b = rankdata(pred), rankdata(actual)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def _top1_regret(pred: np.ndarray, actual: np.ndarray) -> float:
    """actual[chosen] − min(actual), chosen = argmin pred (ties: mean actual of the tied picks)."""
    chosen = pred <= pred.min() + 1e-12 * max(1.0, abs(pred.min()))
    return float(actual[chosen].mean() - actual.min())


@dataclass(frozen=True)
class PredictorEvaluation:
    """Leave-one-target-out quality of a source ranker.

    Attributes:
        name: predictor label.
        mean_spearman: mean over targets of Spearman(predicted, actual) across that target's
            sources (targets with constant predictions are left out and counted).
        ci95: percentile bootstrap CI of ``mean_spearman`` resampling targets.
        spearman_stderr: bootstrap standard error of ``mean_spearman``.
        mean_top1_regret: mean over targets of actual(chosen) − actual(best source).
        regret_ci95: bootstrap CI of ``mean_top1_regret`` over targets.
        random_top1_regret: the expected regret of a uniformly random pick,
            mean over targets of (mean over sources − best).
        pooled_r: Pearson r of the out-of-fold predictions against the actual outcome over all
            pairs (comparable to Appendix C's |r|); pooled_ci95 its source×target bootstrap CI.
        per_target: one row per target (target, n_sources, spearman, top1_regret,
            random_regret, chosen_source, best_source).
    """

    name: str
    mean_spearman: float
    ci95: tuple[float, float]
    mean_top1_regret: float
    random_top1_regret: float
    per_target: pd.DataFrame = field(repr=False)
    spearman_stderr: float = float("nan")
    regret_ci95: tuple[float, float] = (float("nan"), float("nan"))
    pooled_r: float = float("nan")
    pooled_ci95: tuple[float, float] = (float("nan"), float("nan"))
    n_targets: int = 0
    n_degenerate: int = 0

    def __repr__(self) -> str:
        return (f"PredictorEvaluation({self.name}: spearman={self.mean_spearman:+.3f} "
                f"[{self.ci95[0]:+.3f}, {self.ci95[1]:+.3f}], regret={self.mean_top1_regret:.4f} "
                f"(random {self.random_top1_regret:.4f}), pooled r={self.pooled_r:+.3f}, targets={self.n_targets})")

    def to_dict(self) -> dict:
        return {"name": self.name, "mean_spearman": self.mean_spearman, "ci95": list(self.ci95),
                "mean_top1_regret": self.mean_top1_regret, "random_top1_regret": self.random_top1_regret,
                "spearman_stderr": self.spearman_stderr, "regret_ci95": list(self.regret_ci95),
                "pooled_r": self.pooled_r, "pooled_ci95": list(self.pooled_ci95), "n_targets": self.n_targets,
                "n_degenerate": self.n_degenerate}


def _boot_mean(values: np.ndarray, n_boot: int, rng: np.random.Generator, level: float):
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), (float("nan"), float("nan"))
    if v.size == 1:
        return float("nan"), (float(v[0]), float(v[0]))
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(np.std(means, ddof=1)), (float(lo), float(hi))


PredictorSpec = str | Mapping | Callable[[pd.DataFrame], object]


def _fitter(spec: PredictorSpec, features: Sequence[str], fit_target: str, seed: int):
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = {"model": spec}
    spec = dict(spec)
    model = spec.get("model", "ridge")
    feats = list(spec.get("features", ["cos_ft"] if model == "proxy" else features))
    sign = float(spec.get("sign", -1.0))
    allow = bool(spec.get("allow_oracle", False))
    if model not in MODELS:
        raise unknown("predictor model", model, MODELS)
    return lambda train: fit_predictor(train, feats, fit_target, model, seed, allow_oracle=allow, sign=sign)


#: The source's record on the other targets (tier 0: no feature of the pair, only the zoo's known pairs).
RECORD = "source record"
#: The Appendix C oracle: cos(τ*ˢ, τ*ᵀ) needs the target's explanation labels, so no tier can use it; it shows
#: how much of the ceiling the target's explanation vector itself would reach.
ORACLE = "cos τ* (oracle)"


#: The source record fitted on the known pairs at every training seed of the study: less noise in its effects.
RECORD_SEEDS = "source record (every seed)"


def record_over_seeds(every_seed: pd.DataFrame, fit_target: str = "ermse_norm"):
    """A ranker spec for :func:`evaluate_loto`: the source record fitted on the rows of ``every_seed`` (the study at
    every training seed) whose (source, target) pairs are the fold's known pairs — so a held-out target's pairs,
    at any seed, never enter its own fit."""
    key = lambda df: df["source"].astype(str) + "\x1f" + df["target"].astype(str)  # noqa: E731
    return lambda train: fit_predictor(every_seed[key(every_seed).isin(set(key(train))).to_numpy()], [], fit_target,
                                       "record", name=RECORD_SEEDS)


def default_predictors() -> dict[str, PredictorSpec]:
    """ridge and gbr on the given features, the paper's proxy (higher cos_ft → lower E-RMSE) and the source's
    record on the other targets."""
    return {"ridge": "ridge", "gbr": "gbr", "cos_ft (paper proxy)": {"model": "proxy", "features": ["cos_ft"]},
            RECORD: "record"}


def evaluate_loto(df: pd.DataFrame, features: Sequence[str], target: str = "ermse",
                  predictors: Mapping[str, PredictorSpec] | None = None, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95, fit_target: str | None = None, exclude_target_as_source: bool = True,
                  n_random: int = 200) -> list[PredictorEvaluation]:
    """Leave-one-target-out evaluation of source rankers, plus a random-pick baseline.

    For each target T: fit on the pairs (s, t) with t ≠ T and (by default) s ≠ T, predict every
    pair (s, T), then score the ranking of T's sources by Spearman(predicted, actual) and by the
    top-1 regret actual(argmin predicted) − min actual.  A random pick has expected regret
    mean(actual) − min(actual) and expected Spearman 0 (estimated from ``n_random`` random
    orders).  Means over targets get percentile CIs from ``n_boot`` bootstrap resamples of the
    targets.  The out-of-fold predictions also give a pooled Pearson r over all pairs with a
    two-way (source × target) bootstrap CI.

    Args:
        df: pair table (source, target, features, the outcome).
        features: feature columns for ``ridge``/``gbr`` specs.
        target: outcome column to rank by (lower is better), e.g. ``ermse``.
        predictors: name → spec: a model name (``"ridge"``, ``"gbr"``, ``"proxy"``), a dict
            ``{"model", "features", "sign", "allow_oracle"}``, or a callable ``train_df ->``
            object with ``predict(df)``.  Default :func:`default_predictors`.
        n_boot: bootstrap resamples for the CIs.
        seed: seed for bootstraps, random baseline and boosted trees.
        level: CI level.
        fit_target: outcome the models are fitted on (default ``target``; ``ermse_norm`` ranks the
            same within a target).
        exclude_target_as_source: drop pairs with source T from T's training set (see module doc).
        n_random: random orders per target for the random baseline's Spearman.

    Returns:
        One :class:`PredictorEvaluation` per predictor, then one named ``random``.

    Raises:
        DataError: fewer than 3 targets with at least 2 scored sources.
    """
    df = with_normalised(df)
    for c in ("source", "target"):
        if c not in df.columns:
            raise DataError(f"pair table lacks column '{c}'")
    df = df[df["source"] != df["target"]].reset_index(drop=True)
    actual_all = target_values(df, target)
    predictors = default_predictors() if predictors is None else dict(predictors)
    fitters = {name: _fitter(spec, features, fit_target or target, seed) for name, spec in predictors.items()}
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {name: [] for name in [*fitters, "random"]}
    oof = {name: np.full(len(df), np.nan) for name in fitters}
    for T in sorted(df["target"].unique()):
        _loto_target(df, actual_all, T, fitters, rows, oof, rng, exclude_target_as_source, n_random)
    if len(rows["random"]) < 3:
        raise DataError(f"LOTO needs at least 3 targets with 2 or more scored sources, got {len(rows['random'])}")
    return [_summarise_loto(name, pd.DataFrame(rws), df, oof.get(name), actual_all, n_boot, rng, level, seed)
            for name, rws in rows.items()]


def _loto_target(df: pd.DataFrame, actual_all: np.ndarray, T: str, fitters: dict, rows: dict, oof: dict,
                 rng: np.random.Generator, exclude_target_as_source: bool, n_random: int) -> None:
    """Hold out target T: fit every predictor without it, score its ranking of T's sources (in place)."""
    test_mask = (df["target"] == T).to_numpy() & np.isfinite(actual_all)
    if test_mask.sum() < 2:
        log.info("LOTO: target %s has fewer than 2 scored sources; skipped", T)
        return
    train_mask = (df["target"] != T).to_numpy()
    if exclude_target_as_source:
        train_mask = train_mask & (df["source"] != T).to_numpy()
    train, test = df.loc[train_mask], df.loc[test_mask]
    actual = actual_all[test_mask]
    sources = test["source"].to_numpy()
    best = str(sources[np.argmin(actual)])
    rand_regret = float(actual.mean() - actual.min())
    for name, fit in fitters.items():
        pred = np.asarray(fit(train).predict(test), dtype=np.float64)
        oof[name][test_mask] = pred
        rows[name].append({"target": T, "n_sources": int(test_mask.sum()), "spearman": _rank_corr(pred, actual),
                           "top1_regret": _top1_regret(pred, actual), "random_regret": rand_regret,
                           "chosen_source": str(sources[np.argmin(pred)]), "best_source": best})
    rs = [_rank_corr(rng.permutation(actual.size).astype(float), actual) for _ in range(n_random)]
    rows["random"].append({"target": T, "n_sources": int(test_mask.sum()), "spearman": float(np.nanmean(rs)),
                           "top1_regret": rand_regret, "random_regret": rand_regret, "chosen_source": None,
                           "best_source": best})


def _summarise_loto(name: str, per: pd.DataFrame, df: pd.DataFrame, oof: np.ndarray | None, actual_all: np.ndarray,
                    n_boot: int, rng: np.random.Generator, level: float, seed: int) -> PredictorEvaluation:
    """Means over targets with bootstrap CIs, and the pooled out-of-fold Pearson r."""
    sp = per["spearman"].to_numpy(float)
    n_deg = int((~np.isfinite(sp)).sum())
    if n_deg:
        warnings.warn(f"{name}: {n_deg} target(s) with constant predictions left out of mean_spearman",
                      PredictorWarning, stacklevel=3)
    se, ci = _boot_mean(sp, n_boot, rng, level)
    _, rci = _boot_mean(per["top1_regret"].to_numpy(float), n_boot, rng, level)
    pooled_r, pooled_ci = float("nan"), (float("nan"), float("nan"))
    if oof is not None:
        tab = pd.DataFrame({"source": df["source"], "target": df["target"], "pred": oof, "actual": actual_all})
        tab = tab[np.isfinite(tab["pred"]) & np.isfinite(tab["actual"])]
        if len(tab) >= 3 and tab["pred"].nunique() > 1 and tab["actual"].nunique() > 1:
            pooled_r = pearson(tab["pred"], tab["actual"]).statistic
            pooled_ci = tuple(pair_bootstrap_ci(tab, "pred", "actual", n_boot=n_boot, seed=seed, level=level))
    return PredictorEvaluation(
        name=name, mean_spearman=float(np.nanmean(sp)) if np.isfinite(sp).any() else float("nan"), ci95=ci,
        mean_top1_regret=float(per["top1_regret"].mean()), random_top1_regret=float(per["random_regret"].mean()),
        per_target=per, spearman_stderr=se, regret_ci95=rci, pooled_r=pooled_r, pooled_ci95=pooled_ci,
        n_targets=len(per), n_degenerate=n_deg)


def evaluate_rankers(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                     every_seed: pd.DataFrame | None = None) -> list[dict]:
    """Leave-one-target-out evaluation of the tier predictors, the paper's cos(τ_ft) proxy, the source record,
    random, and the oracle cos(τ*ˢ, τ*ᵀ) as a reference no ranker can use.

    With ``every_seed`` (the same study at every training seed, ``table`` one of them) the source record
    fitted on the known pairs at every seed (:func:`record_over_seeds`) is scored too.

    :func:`diag.decide.predictor.evaluate_loto` on E-RMSE with each tier's features (a tier whose features
    equal a lower tier's is skipped); the proxy, the record, random and the oracle appear once, under the
    first tier (the oracle's ``tier`` is ``"oracle"``).

    Returns:
        One dict per ranker: ``name`` (``"<model> (tier t)"``, or the proxy's or ``random``),
        ``tier``, ``mean_spearman``, ``ci95``, ``mean_top1_regret``, ``random_top1_regret``,
        ``pooled_r``, ``pooled_ci95``.
    """
    out = []
    seen = set()
    once = ("proxy", "random", RECORD, ORACLE)
    predictors = default_predictors()
    if every_seed is not None and every_seed["seed"].nunique() > 1:
        predictors[RECORD_SEEDS] = record_over_seeds(every_seed)
    if "cos_star" in table and pd.to_numeric(table["cos_star"], errors="coerce").notna().any():
        predictors[ORACLE] = {"model": "proxy", "features": ["cos_star"], "allow_oracle": True}
    for tier in (0, 1, 2):
        feats = tier_features(table, tier)
        if not feats or tuple(feats) in seen:
            continue
        seen.add(tuple(feats))
        for ev in evaluate_loto(table, feats, target="ermse", predictors=predictors, n_boot=n_boot, seed=seed,
                                fit_target="ermse_norm"):
            d = {"name": ev.name if any(k in ev.name for k in once) else f"{ev.name} (tier {tier})",
                 "tier": "oracle" if ev.name == ORACLE else tier, "mean_spearman": ev.mean_spearman,
                 "ci95": list(ev.ci95), "mean_top1_regret": ev.mean_top1_regret,
                 "random_top1_regret": ev.random_top1_regret, "pooled_r": ev.pooled_r,
                 "pooled_ci95": list(ev.pooled_ci95)}
            if d["name"] in {o["name"] for o in out}:
                continue
            out.append(d)
        # the feature-free rankers score the same at every tier: only ridge and gbr are fitted again
        predictors = {k: v for k, v in predictors.items() if not any(w in k for w in once)}
    return out


# ------------------------------------------------------------------ coverage of the prediction intervals


@dataclass(frozen=True)
class Coverage:
    """How often one quantity's intervals held the measured value, leave one target out.

    Attributes:
        quantity: ``ermse_norm``, ``acc_drop`` (plain eq. 8 at λ2 = 0.7) or ``gain`` (1 − E-RMSE ÷
            θ_ftᵀ's at every λ2 of the table, predicted as (1 − predicted ratio)·λ2/0.7).
        level: the intervals' nominal level.
        n, covered: scored (target, source[, λ2]) rows and how many fell inside their interval.
        coverage: covered / n; ci: its Wilson interval at ``ci_level`` (pairs taken as independent;
            those of one target are not, so it is somewhat narrow).
        bias: mean of predicted − measured; bias_se its standard error (sd / √n).
        per_seed: coverage per training seed; n_targets: held-out (seed, target) folds.
    """

    quantity: str
    level: float
    n: int
    covered: int
    coverage: float
    ci: tuple[float, float]
    ci_level: float
    bias: float
    bias_se: float
    per_seed: dict[int, float]
    n_targets: int

    def to_dict(self) -> dict:
        return {"quantity": self.quantity, "level": self.level, "n": self.n, "covered": self.covered,
                "coverage": self.coverage, "ci": list(self.ci), "ci_level": self.ci_level, "bias": self.bias,
                "bias_se": self.bias_se, "per_seed": {str(k): v for k, v in self.per_seed.items()},
                "n_targets": self.n_targets}


def loto_coverage(table: pd.DataFrame, tier: int = 2, level: float = PREDICTION_LEVEL, model: str = RANKER,
                  ci_level: float = 0.95, seed: int = 0) -> tuple[list[Coverage], pd.DataFrame]:
    """Coverage of the ranking's intervals on held-out targets, per quantity, over the seeds of a study table.

    Per training seed of ``table`` (plain eq. 8 rows of one variant) and per target T: the
    predictor of :func:`diag.decide.predictor.fit_pair_predictor` is fitted on the λ2 = 0.7 pairs
    involving T neither as target nor as source (its intervals from a nested leave-one-target-out),
    with the tier's features, and T's pairs are scored on their measured test values: E-RMSE ÷
    θ_ftᵀ's and the accuracy drop at λ2 = 0.7, and the gain 1 − E-RMSE ÷ θ_ftᵀ's at every λ2 the
    table holds (the ranking's first-order gain, (1 − ratio)·λ2/0.7, with the ratio's interval mapped
    alike; at λ2 = 0.7 alone it is the ratio's coverage again).

    Returns:
        (one :class:`Coverage` per quantity, the scored rows: seed, target, source, lambda2, quantity,
        predicted, lo, hi, measured, inside).

    Raises:
        DataError: no target with enough known pairs to fit.
    """
    runs = with_run_columns(with_normalised(table))
    rows = []
    for run_seed, run in runs.groupby("seed"):
        lam = run["lambda2"].map(lam_key)
        at07 = run[lam == lam_key(PAPER_LAMBDA2)]
        for target in sorted(at07["target"].unique()):
            train = training_pairs(at07, target)
            if len(train) < MIN_TRAINING_PAIRS:
                continue
            try:
                pred = fit_pair_predictor(train, tier_features(train, tier), model, level, seed)
            except DataError as err:  # e.g. fewer than 3 known pairs with a finite accuracy drop
                log.info("coverage: target %s of seed %s skipped (%s)", target, run_seed, err)
                continue
            held = at07[(at07["target"] == target) & (at07["source"] != target)].reset_index(drop=True)
            p = pred.predict(held)
            key = {"seed": int(run_seed), "target": target}
            for q in QUANTITIES:
                rows += [{**key, "source": s, "lambda2": PAPER_LAMBDA2, "quantity": q, "predicted": v, "lo": a,
                          "hi": b, "measured": y} for s, v, a, b, y in
                         zip(held["source"], p[f"predicted_{q}"], p[f"predicted_{q}_lo"], p[f"predicted_{q}_hi"],
                             target_values(held, q))]
            ratio = dict(zip(held["source"], zip(p["predicted_ermse_norm"], p["predicted_ermse_norm_lo"],
                                                 p["predicted_ermse_norm_hi"])))
            for _, r in run[(run["target"] == target) & run["source"].isin(list(ratio))].iterrows():
                v, a, b = ratio[r["source"]]
                size = float(r["lambda2"]) / PAPER_LAMBDA2
                rows.append({**key, "source": r["source"], "lambda2": float(r["lambda2"]), "quantity": "gain",
                             "predicted": (1 - v) * size, "lo": (1 - b) * size, "hi": (1 - a) * size,
                             "measured": 1.0 - float(r["ermse_norm"])})
    scored = pd.DataFrame(rows)
    if scored.empty:
        raise DataError(f"no target with {MIN_TRAINING_PAIRS} or more known pairs without it: no coverage to measure")
    scored = scored[np.isfinite(scored["measured"].astype(float))].reset_index(drop=True)
    scored["inside"] = (scored["lo"] <= scored["measured"]) & (scored["measured"] <= scored["hi"])
    return [_coverage(q, scored[scored["quantity"] == q], level, ci_level) for q in (*QUANTITIES, "gain")], scored


def _coverage(quantity: str, rows: pd.DataFrame, level: float, ci_level: float) -> Coverage:
    n, k = len(rows), int(rows["inside"].sum())
    err = (rows["predicted"] - rows["measured"]).to_numpy(float)
    per_seed = {int(s): float(g["inside"].mean()) for s, g in rows.groupby("seed")}
    return Coverage(quantity, level, n, k, k / n if n else math.nan, wilson_interval(k, n, ci_level) if n else
                    (math.nan, math.nan), ci_level, float(err.mean()) if n else math.nan,
                    float(err.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan, per_seed,
                    int(rows[["seed", "target"]].drop_duplicates().shape[0]))
