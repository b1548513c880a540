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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from diag.stats import with_normalised
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


def target_values(df: pd.DataFrame, target: str) -> np.ndarray:
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
    y = target_values(df, target)
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


# ---------------------------------------------------------------------------- known pairs


#: Fewest known pairs without the target to fit the ranker (below: the cos(τ_ftˢ, τ_ftᵀ) proxy).
MIN_TRAINING_PAIRS = 4


def training_pairs(table: pd.DataFrame, target: str) -> pd.DataFrame:
    """Known pairs usable to rank sources for ``target``: none that involve the target."""
    return table[(table["target"] != target) & (table["source"] != target)].copy()


def loto_residual_sd(train: pd.DataFrame, features: Sequence[str], model: str = "ridge") -> tuple[float, str]:
    """(sd, how): the out-of-sample RMS residual of the normalised-E-RMSE predictor on the known pairs.

    ``leave-one-target-out`` (how = ``"leave-one-target-out"``): for each target T of ``train``, fit
    on the pairs involving T neither as target nor as source, predict T's pairs, and keep the
    residuals (predicted − measured E-RMSE ÷ θ_ftᵀ) — what the predictor misses on a target it has
    not seen, as a new target's ranking does (the in-sample residual understates it). When no
    target can be held out (fewer than 3 pairs would remain: a suite of 4 domains), each pair is
    held out in turn instead (``"leave-one-pair-out"``: its training pairs may share its domains, so
    this one is optimistic). NaN (how ``"none"``) with fewer than 4 pairs or no finite residual.
    """
    train = with_normalised(train).reset_index(drop=True)
    train = train[pd.to_numeric(train["ermse_norm"], errors="coerce").notna()]
    folds = [((train["target"] != t) & (train["source"] != t), train["target"] == t)
             for t in sorted(train["target"].unique())]
    folds = [(fit, held) for fit, held in folds if fit.sum() >= 3]
    how = "leave-one-target-out"
    if not folds:
        folds = [(train.index != i, train.index == i) for i in train.index] if len(train) >= 4 else []
        how = "leave-one-pair-out"
    res = np.concatenate([_residuals(train[fit], train[held], features, model) for fit, held in folds]) \
        if folds else np.array([])
    res = res[np.isfinite(res)]
    return (float(np.sqrt(np.mean(res ** 2))), how) if res.size else (math.nan, "none")


def _residuals(fit: pd.DataFrame, held: pd.DataFrame, features: Sequence[str], model: str) -> np.ndarray:
    return fit_predictor(fit, features, "ermse_norm", model).predict(held) - held["ermse_norm"].to_numpy(float)
