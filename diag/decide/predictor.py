"""Turning pair diagnostics into predictions, one predictor per quantity, each with an interval.

The quantities (:data:`QUANTITIES`), both of plain eq. 8 at λ2 = 0.7: E-RMSE ÷ θ_ftᵀ's
(``ermse_norm``) and the accuracy drop 1 − accuracy ÷ θ_ftᵀ's (``acc_drop``: positive = accuracy
lost, the sign of every measured drop). :func:`fit_pair_predictor` fits one
:class:`QuantityModel` each; its interval is the jackknife+ (:func:`diag.stats.jackknife_plus`)
over leave-one-target-out fits — targets are the exchangeable unit — and where the
leave-one-target-out R² is ≤ 0 the quantity is declared unpredictable and the training mean,
with its interval, stands for every source.

Data-access tiers (what the owner of target T must provide; never target explanation labels):

* tier 0 — weights only: cos(τ_ftˢ, τ_ftᵀ) globally (``cos_ft``) and per block
  (``cos_ft.<group>``, e.g. ``cos_ft.block.3``), the norms ‖τ*ˢ‖, ‖τ_ftˢ‖, ‖τ_ftᵀ‖, and the
  source's own in-domain quality (``ermse_star_source``, ``accuracy_ft_source``: measured on
  S's data, which the source publisher has).  cos(τ*ˢ, τ*ᵀ) is *not* tier 0: τ*ᵀ needs
  target explanation labels.
* tier 1 — a published Hessian card of T: ``risk_card``, ``risk_diag`` (R = τ*ˢᵀ Hᵀ τ*ˢ).
* tier 2 — labelled target images: ``risk_exact`` and ``accuracy_val_ft_target`` (θ_ftᵀ's val accuracy, the
  same quantity in the study table and when ranking).

Columns derived from target explanation labels or from the transfer outcome (``cos_star``,
``ermse``, ``ermse_norm``, ``accuracy``, ``acc_norm``, ``ermse_ft_target``, ...) are refused
as features unless ``allow_oracle=True`` (for research comparisons only).

The leave-one-target-out evaluation (:func:`diag.decide.evaluation.evaluate_loto`) and fits hold out a target T and fits on
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
from diag.constants import PREDICTION_LEVEL
from diag.decide.record import known_effects, training_pairs
from diag.stats import jackknife_plus, with_normalised
from train.errors import DataError, unknown

log = logging.getLogger(__name__)

MODELS = ("ridge", "gbr", "proxy", "mean", "record")
#: The pair predictor of ``rank-sources`` and ``screen`` (and of their validations): each source's record on the
#: known pairs, the best data-free ranker leave one target out on the mini-suite.
RANKER = "record"
#: Predictors that read no feature of the pair (the record: the source's name; the mean: nothing).
FEATURE_FREE_MODELS = frozenset({"record", "mean"})

#: Candidate feature columns per tier (cumulative); ``cos_ft.<group>`` columns join tier 0.
TIER_FEATURES: dict[int, tuple[str, ...]] = {
    0: ("cos_ft", "norm_star_source", "norm_ft_source", "norm_ft_target", "ermse_star_source",
        "accuracy_ft_source"),
    1: ("risk_card", "risk_diag"),
    2: ("risk_exact", "accuracy_val_ft_target"),
}
BLOCK_COS_PREFIX = "cos_ft."

#: Columns that need target explanation labels or are the outcome itself.
ORACLE_COLUMNS = frozenset({"cos_star", "ermse", "ermse_norm", "accuracy", "acc_norm", "acc_drop",
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
    from sklearn.dummy import DummyRegressor
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    imputer = SimpleImputer(strategy="median", keep_empty_features=True)
    if model == "ridge":
        return make_pipeline(imputer, StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    if model == "mean":
        return make_pipeline(imputer, DummyRegressor(strategy="mean"))
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
        target: the outcome column it predicts (e.g. ``ermse_norm``, ``acc_drop``).
        model: ``ridge`` (standardised ridge, α chosen by leave-one-out CV), ``gbr``
            (gradient-boosted depth-2 trees), ``mean`` (the training mean), ``record`` (the source's effect
            in outcome ≈ source effect + target effect over the known pairs: no feature of the pair, the
            zoo's track record of the source) or
            ``proxy`` (a single feature with a fixed sign: prediction = ``sign`` · feature, a ranking score,
            not calibrated).
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
    span: tuple = field(default=(), repr=False)

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        """Predicted ``target`` for every row of ``df`` (NaN features are imputed by the training median).

        A feature outside the range the known pairs span is clipped to it: a new target whose
        risks exceed every known target's (GTSRB's, on the mini-suite) gets the prediction at the
        edge of what was seen, not a linear extrapolation far beyond it.
        """
        if isinstance(self.estimator, tuple):  # the record, or the mean of a model with no feature
            record, overall = self.estimator
            return np.array([record.get(str(s), overall) for s in df["source"]], dtype=np.float64)
        _check_features(df, self.features, allow_oracle=True)
        X = _design(df, self.features)
        if self.model == "proxy":
            return self.sign * X[:, 0]
        if self.span:
            X = np.clip(X, self.span[0], self.span[1])
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
    may be ``ermse_norm`` (= ermse / ermse_ft_target), ``acc_norm`` or ``acc_drop``
    (= 1 − acc_norm, the relative accuracy lost against θ_ftᵀ).  Rows with a NaN outcome are
    dropped; NaN features are imputed by the training median.

    Args:
        df: pair table.
        features: feature columns (see :func:`tier_features`).
        target: outcome column.
        model: ``"ridge"``, ``"gbr"``, ``"mean"`` (the training mean, whatever the features), ``"record"``
            (the source's effect in an additive source + target fit over ``df``, whatever the features) or
            ``"proxy"`` (first feature times ``sign``, unfitted).
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
    if model == "record" or (model == "mean" and not features):  # nothing to impute: no sklearn model
        return _fit_record(df, target, name, model)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # an all-NaN column: no bound (±inf)
        span = (np.nan_to_num(np.nanmin(X, axis=0), nan=-np.inf), np.nan_to_num(np.nanmax(X, axis=0), nan=np.inf))
    return Predictor(name=name or model, features=tuple(features), target=target, model=model,
                     n_train=int(ok.sum()), train_rmse=rmse, estimator=est, span=span)


def _fit_record(df: pd.DataFrame, target: str, name: str | None, model: str = "record") -> Predictor:
    """The sources' record (:func:`diag.decide.record.known_effects`): predicts each source's effect; ``model``
    ``"mean"``: the training mean for every source (the fallback of a model with no feature)."""
    y = target_values(df, target)  # a missing outcome column is refused by name
    effects, rmse, n = known_effects(df, target)
    if model == "mean":
        effects, rmse = {}, float(np.nanstd(y))
    overall = float(np.nanmean(y)) if model == "mean" else float(np.mean(list(effects.values())))
    return Predictor(name=name or model, features=(), target=target, model=model, n_train=n, train_rmse=rmse,
                     estimator=(effects, overall))


# ------------------------------------------------------- one predictor per quantity, with intervals


#: The predicted quantities (each the outcome column it is fitted on), of plain eq. 8 at λ2 = 0.7.
QUANTITIES = {"ermse_norm": "E-RMSE ÷ θ_ftᵀ's", "acc_drop": "accuracy drop (1 − accuracy ÷ θ_ftᵀ's)"}


@dataclass(frozen=True)
class QuantityModel:
    """The predictor of one quantity and its leave-one-unit-out fits (the intervals' jackknife+).

    Attributes:
        quantity: a key of :data:`QUANTITIES` (the outcome column).
        full: the fit on every known pair (the point prediction): the requested model, or the
            training mean (``model == "mean"``) when the requested one was no better out of sample.
        folds: μ₋ᵢ, the same model fitted without unit i (a target: pairs with it as target or source).
        residuals: unit i's held-out |y − μ₋ᵢ(x)|.
        unit: ``"target"`` (targets held out), ``"pair"`` (too few targets: each pair, optimistic)
            or ``"none"`` (fewer than 2 units: no interval).
        loto_r2: 1 − Σ(y − μ₋ᵢ(x))² / Σ(y − ȳ₋ᵢ)² of the requested model, ȳ₋ᵢ fit i's mean outcome.
        requested: the model asked for (``ridge``, ``gbr``).
    """

    quantity: str
    full: Predictor
    folds: tuple[Predictor, ...]
    residuals: tuple[np.ndarray, ...]
    unit: str
    loto_r2: float
    requested: str

    @property
    def predictable(self) -> bool:
        """Whether the features beat the training mean out of sample (LOTO R² > 0)."""
        return self.full.model != "mean"

    def predict(self, df: pd.DataFrame, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(point, lo, hi) for every row of ``df``: μ(x) and the jackknife+ interval at ``level``."""
        point = self.full.predict(df)
        if not self.folds:
            return point, np.full(len(df), -np.inf), np.full(len(df), np.inf)
        centres = np.column_stack([f.predict(df) for f in self.folds])
        lo, hi = jackknife_plus(centres, self.residuals, level)
        return point, lo, hi


def _folds(train: pd.DataFrame) -> tuple[str, list[tuple[pd.DataFrame, pd.DataFrame]]]:
    """(unit, [(fit rows, held rows)]): one fold per target of ``train`` whose fit keeps ≥ 3 pairs
    (:func:`training_pairs`: the target neither as target nor as source); with fewer than 2 such targets,
    one fold per pair (its fit may share its domains); ``"none"`` below 4 pairs."""
    folds = [(training_pairs(train, t), train[train["target"] == t]) for t in sorted(train["target"].unique())]
    folds = [(fit, held) for fit, held in folds if len(fit) >= 3 and len(held)]
    if len(folds) >= 2:
        return "target", folds
    if len(train) >= 4:
        return "pair", [(train.drop(index=i), train.loc[[i]]) for i in train.index]
    return "none", []


def fit_quantity(train: pd.DataFrame, features: Sequence[str], quantity: str, model: str = "ridge",
                 seed: int = 0) -> QuantityModel:
    """Fit the predictor of ``quantity`` on the known pairs, with its leave-one-target-out fits.

    Out-of-sample skill is LOTO R² (:class:`QuantityModel`); where it is ≤ 0 (or undefined) the
    quantity is declared unpredictable from ``features`` and the training mean (model ``mean``), with
    its own leave-one-out fits, replaces the requested model.

    Raises:
        DataError: unknown quantity, fewer than 3 pairs with a finite outcome, or bad features.
    """
    if quantity not in QUANTITIES:
        raise unknown("predicted quantity", quantity, list(QUANTITIES))
    train = with_normalised(train)
    train = train[np.isfinite(target_values(train, quantity))].reset_index(drop=True)
    unit, folds = _folds(train)
    fits = [fit_predictor(fit, features, quantity, model, seed) for fit, _ in folds]
    sse = sum(float(np.sum((f.predict(held) - target_values(held, quantity)) ** 2)) for f, (_, held) in zip(fits, folds))
    sst = sum(float(np.sum((target_values(held, quantity) - np.mean(target_values(fit, quantity))) ** 2))
              for fit, held in folds)
    r2 = 1.0 - sse / sst if sst > 0 else math.nan
    chosen = model if r2 > 0 else "mean"
    if chosen != model:
        fits = [fit_predictor(fit, features, quantity, chosen, seed) for fit, _ in folds]
    res = tuple(np.abs(f.predict(held) - target_values(held, quantity)) for f, (_, held) in zip(fits, folds))
    return QuantityModel(quantity, fit_predictor(train, features, quantity, chosen, seed, name=f"{chosen} {quantity}"),
                         tuple(fits), res, unit, r2, model)


@dataclass(frozen=True)
class PairPredictor:
    """One :class:`QuantityModel` per quantity of :data:`QUANTITIES`, and the intervals' level."""

    models: dict[str, QuantityModel]
    level: float

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        """Columns ``predicted_<q>``, ``predicted_<q>_lo``, ``predicted_<q>_hi`` per quantity q (±∞: no interval)."""
        out = pd.DataFrame(index=df.index)
        for q, m in self.models.items():
            out[f"predicted_{q}"], out[f"predicted_{q}_lo"], out[f"predicted_{q}_hi"] = m.predict(df, self.level)
        return out

    def summary(self) -> dict:
        """Per quantity: model, unit, held-out units, LOTO R², predictable."""
        return {q: {"model": m.full.model, "requested": m.requested, "unit": m.unit, "n_units": len(m.folds),
                    "loto_r2": m.loto_r2, "predictable": m.predictable} for q, m in self.models.items()}

    def notes(self) -> list[str]:
        """What the intervals are, and which quantities fell back to the training mean."""
        units = {m.unit for m in self.models.values()}
        out = [f"intervals: {self.level:.0%} jackknife+ over leave-one-{'/'.join(sorted(units))}-out fits of the "
               "known pairs" + ("; too few domains to hold a target out, so they are optimistic"
                                if units != {"target"} else "")]
        for q, m in self.models.items():
            if not m.predictable:
                what = "the sources' record" if m.requested == "record" else "these features"
                out.append(f"{QUANTITIES[q]} is not predictable from {what} (leave-one-out R² = "
                           f"{m.loto_r2:.3g} ≤ 0 for {m.requested}): the training mean stands for every source")
        return out


def fit_pair_predictor(train: pd.DataFrame, features: Sequence[str], model: str = "ridge",
                       level: float = PREDICTION_LEVEL, seed: int = 0) -> PairPredictor:
    """:func:`fit_quantity` for every quantity of :data:`QUANTITIES` on the same known pairs and features."""
    if not 0.0 < level < 1.0:
        raise DataError(f"--level must be in (0, 1), got {level}")
    return PairPredictor({q: fit_quantity(train, features, q, model, seed) for q in QUANTITIES}, level)


def rank_sources(candidates: pd.DataFrame, predictor: PairPredictor) -> pd.DataFrame:
    """Candidate pairs of one target with :meth:`PairPredictor.predict`'s columns, best first, with a 1-based ``rank``.

    Sorted by predicted E-RMSE ÷ θ_ftᵀ's (lower is better); ties keep input order.
    """
    out = pd.concat([candidates.reset_index(drop=True), predictor.predict(candidates).reset_index(drop=True)], axis=1)
    out = out.sort_values("predicted_ermse_norm", kind="stable").reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out
