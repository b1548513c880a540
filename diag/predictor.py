"""Turning pair diagnostics into predicted E-RMSE / accuracy change, and choosing λ2.

Data-access tiers (what the owner of target T must provide; never target explanation labels):

* tier 0 — weights only: cos(τ_ftˢ, τ_ftᵀ) globally (``cos_ft``) and per block
  (``cos_ft.<group>``, e.g. ``cos_ft.block.3``), the norms ‖τ*ˢ‖, ‖τ_ftˢ‖, ‖τ_ftᵀ‖, and the
  source's own in-domain quality (``ermse_star_source``, ``accuracy_ft_source``: measured on
  S's data, which the source publisher has).  cos(τ*ˢ, τ*ᵀ) is *not* tier 0: τ*ᵀ needs
  target explanation labels.
* tier 1 — a published Hessian card of T: ``risk_card``, ``risk_diag`` (R = τ*ˢᵀ Hᵀ τ*ˢ).
* tier 2 — labelled target images: ``risk_exact`` and ``accuracy_ft_target``.

Columns derived from target explanation labels or from the transfer outcome (``cos_star``,
``ermse``, ``ermse_norm``, ``accuracy``, ``acc_norm``, ``ermse_ft_target``, ...) are refused
as features unless ``allow_oracle=True`` (for research comparisons only).

The leave-one-target-out evaluation (:func:`evaluate_loto`) holds out a target T and fits on
pairs that involve T neither as target nor — by default — as source: a pair (T, s) carries
τ*ᵀ (made with T's explanation labels) in its features and is the mirror of (s, T), whose
cos_ft is identical, so training on it leaks information a real target owner lacks.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from diag.stats import pair_bootstrap_ci, pearson, with_normalised
from diag.stats.correlation import rankdata
from train.errors import DataError, unknown

log = logging.getLogger(__name__)

MODELS = ("ridge", "gbr", "proxy")

#: Candidate feature columns per tier (cumulative); ``cos_ft.<group>`` columns join tier 0.
TIER_FEATURES: dict[int, tuple[str, ...]] = {
    0: ("cos_ft", "norm_star_source", "norm_ft_source", "norm_ft_target", "ermse_star_source",
        "accuracy_ft_source"),
    1: ("risk_card", "risk_diag"),
    2: ("risk_exact", "accuracy_ft_target"),
}
BLOCK_COS_PREFIX = "cos_ft."

#: Columns that need target explanation labels or are the outcome itself.
ORACLE_COLUMNS = frozenset({"cos_star", "ermse", "ermse_norm", "accuracy", "acc_norm", "acc_change", "acc_drop",
                            "ermse_ft_target", "kendall", "iou1", "iou5", "iou10"})


class PredictorWarning(UserWarning):
    """A predictor evaluation had degenerate targets (constant predictions, too few sources)."""


def tier_features(df: pd.DataFrame, tier: int) -> list[str]:
    """Feature columns of ``df`` available at ``tier`` (0, 1 or 2), skipping all-NaN columns.

    Tier k includes every feature of tiers < k; per-block ``cos_ft.<group>`` columns are tier 0.
    """
    if tier not in TIER_FEATURES:
        raise unknown("tier", str(tier), [str(t) for t in TIER_FEATURES])
    cands: list[str] = []
    for t in range(tier + 1):
        cands += TIER_FEATURES[t]
        if t == 0:
            cands += sorted(c for c in df.columns if str(c).startswith(BLOCK_COS_PREFIX))
    return [c for c in cands if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any()]


def _check_features(df: pd.DataFrame, features: Sequence[str], allow_oracle: bool) -> list[str]:
    features = list(features)
    if not features:
        raise DataError("no features given")
    missing = [f for f in features if f not in df.columns]
    if missing:
        raise DataError(f"pair table lacks feature column(s) {', '.join(missing)}")
    oracle = [f for f in features if f in ORACLE_COLUMNS or str(f).startswith("cos_star")]
    if oracle and not allow_oracle:
        raise DataError(f"feature(s) {', '.join(oracle)} need target explanation labels or are the outcome; "
                        "pass allow_oracle=True only for research comparisons")
    return features


def _design(df: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    """Feature matrix; risk_* and norm_* columns get a signed log, s·log1p(|x|) (they span decades)."""
    cols = []
    for f in features:
        v = pd.to_numeric(df[f], errors="coerce").to_numpy(dtype=np.float64)
        if str(f).startswith(("risk_", "norm_")):
            v = np.sign(v) * np.log1p(np.abs(v))
        cols.append(v)
    return np.column_stack(cols) if cols else np.empty((len(df), 0))


def _estimator(model: str, seed: int):
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    imputer = SimpleImputer(strategy="median", keep_empty_features=True)
    if model == "ridge":
        return make_pipeline(imputer, StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    if model == "gbr":
        return make_pipeline(imputer, GradientBoostingRegressor(n_estimators=150, max_depth=2, learning_rate=0.05,
                                                                subsample=0.8, random_state=seed))
    raise unknown("predictor model", model, MODELS)


@dataclass(frozen=True)
class Predictor:
    """A fitted map from pair diagnostics to one outcome column.

    Attributes:
        name: label used in reports.
        features: feature columns, in order.
        target: the outcome column it predicts (e.g. ``ermse_norm``, ``acc_change``).
        model: ``ridge`` (standardised ridge, α chosen by leave-one-out CV), ``gbr``
            (gradient-boosted depth-2 trees) or ``proxy`` (a single feature with a fixed sign:
            prediction = ``sign`` · feature, a ranking score, not calibrated).
        n_train: training pairs used.
        train_rmse: in-sample root mean squared error (NaN for a proxy).
    """

    name: str
    features: tuple[str, ...]
    target: str
    model: str
    n_train: int
    train_rmse: float
    estimator: object = field(default=None, repr=False)
    sign: float = -1.0

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        """Predicted ``target`` for every row of ``df`` (NaN features are imputed by the training median)."""
        _check_features(df, self.features, allow_oracle=True)
        X = _design(df, self.features)
        if self.model == "proxy":
            return self.sign * X[:, 0]
        return np.asarray(self.estimator.predict(X), dtype=np.float64)

    def to_dict(self) -> dict:
        return {"name": self.name, "features": list(self.features), "target": self.target, "model": self.model,
                "n_train": self.n_train, "train_rmse": self.train_rmse}


def _target_values(df: pd.DataFrame, target: str) -> np.ndarray:
    if target not in df.columns:
        raise DataError(f"pair table has no outcome column '{target}' (nor the columns to derive it)")
    return pd.to_numeric(df[target], errors="coerce").to_numpy(dtype=np.float64)


def fit_predictor(df: pd.DataFrame, features: Sequence[str], target: str = "ermse_norm", model: str = "ridge",
                  seed: int = 0, allow_oracle: bool = False, name: str | None = None, sign: float = -1.0) -> Predictor:
    """Fit outcome ≈ f(features) on known pairs.

    ``df`` gets the derived columns of :func:`diag.stats.with_normalised` first, so ``target``
    may be ``ermse_norm`` (= ermse / ermse_ft_target), ``acc_norm`` or ``acc_change``
    (= acc_norm − 1, the relative accuracy change against θ_ftᵀ).  Rows with a NaN outcome are
    dropped; NaN features are imputed by the training median.

    Args:
        df: pair table.
        features: feature columns (see :func:`tier_features`).
        target: outcome column.
        model: ``"ridge"``, ``"gbr"`` or ``"proxy"`` (first feature times ``sign``, unfitted).
        seed: random state of the boosted trees.
        allow_oracle: permit features that need target explanation labels.
        name: label; defaults to ``model``.
        sign: direction of the proxy (−1: a larger feature predicts a smaller outcome).

    Raises:
        DataError: missing or oracle features, fewer than 3 usable rows.
        UnknownNameError: unknown ``model``.
    """
    if model not in MODELS:
        raise unknown("predictor model", model, MODELS)
    df = with_normalised(df)
    features = _check_features(df, features, allow_oracle)
    y = _target_values(df, target)
    ok = np.isfinite(y)
    if ok.sum() < 3:
        raise DataError(f"need at least 3 pairs with a finite '{target}' to fit, got {int(ok.sum())}")
    X = _design(df.loc[ok], features)
    if model == "proxy":
        return Predictor(name=name or f"proxy {features[0]}", features=(features[0],), target=target, model=model,
                         n_train=int(ok.sum()), train_rmse=float("nan"), sign=sign)
    est = _estimator(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        est.fit(X, y[ok])
    rmse = float(np.sqrt(np.mean((est.predict(X) - y[ok]) ** 2)))
    return Predictor(name=name or model, features=tuple(features), target=target, model=model,
                     n_train=int(ok.sum()), train_rmse=rmse, estimator=est)


@dataclass(frozen=True)
class SourceModel:
    """Two predictors fitted on the same features: normalised E-RMSE and accuracy change."""

    ermse: Predictor
    acc: Predictor

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        """Columns predicted_ermse_norm, predicted_acc_change and predicted_acc_drop (= −change)."""
        out = pd.DataFrame(index=df.index)
        out["predicted_ermse_norm"] = self.ermse.predict(df)
        out["predicted_acc_change"] = self.acc.predict(df)
        out["predicted_acc_drop"] = -out["predicted_acc_change"]
        return out

    def to_dict(self) -> dict:
        return {"ermse": self.ermse.to_dict(), "acc": self.acc.to_dict()}


def fit_source_model(df: pd.DataFrame, features: Sequence[str], model: str = "ridge", seed: int = 0) -> SourceModel:
    """Fit :class:`SourceModel`: ``ermse_norm`` and ``acc_change`` from the same features."""
    return SourceModel(ermse=fit_predictor(df, features, "ermse_norm", model, seed, name=f"{model} ermse_norm"),
                       acc=fit_predictor(df, features, "acc_change", model, seed, name=f"{model} acc_change"))


def rank_sources(candidates: pd.DataFrame, source_model: SourceModel) -> pd.DataFrame:
    """Candidate pairs of one target with predictions, sorted best first, with a 1-based ``rank``.

    Sorted by predicted normalised E-RMSE (lower is better); ties keep input order.
    """
    out = pd.concat([candidates.reset_index(drop=True),
                     source_model.predict(candidates).reset_index(drop=True)], axis=1)
    out = out.sort_values("predicted_ermse_norm", kind="stable").reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


# ---------------------------------------------------------------------------------------------
# leave-one-target-out evaluation


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


def default_predictors() -> dict[str, PredictorSpec]:
    """ridge and gbr on the given features, and the paper's proxy (higher cos_ft → lower E-RMSE)."""
    return {"ridge": "ridge", "gbr": "gbr", "cos_ft (paper proxy)": {"model": "proxy", "features": ["cos_ft"]}}


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
    actual_all = _target_values(df, target)
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


def evaluations_frame(evaluations: Sequence[PredictorEvaluation]) -> pd.DataFrame:
    """One row per predictor (the ``to_dict`` fields), for printing."""
    return pd.DataFrame([e.to_dict() for e in evaluations])
