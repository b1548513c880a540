"""The sources' track record: outcome ≈ source effect + target effect, fitted on the known pairs.

A source that helped the other targets tends to help a new one too, whatever the pair's features.
:func:`source_effects` fits the additive model ``y(s, t) = a_s + b_t`` by least squares (alternating
means; the effects are identified up to one constant, fixed by centring the target effects) on the
known pairs, so a source's effect is net of which targets it happened to be paired with — a plain mean
of its outcomes is not. The ``record`` ranker (:func:`diag.decide.predictor.fit_predictor`) ranks a new
target's sources by ``a_s``. The known pairs a predictor may learn for a target are those that involve
it neither as target nor as source (:func:`training_pairs`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from diag.stats import with_normalised
from train.errors import DataError

__all__ = ["MIN_TRAINING_PAIRS", "distinct_pairs", "known_effects", "record_note", "source_effects",
           "training_pairs"]


def source_effects(sources, targets, y, sweeps: int = 200, tol: float = 1e-12) -> tuple[dict[str, float], float]:
    """(source → a_s, root mean squared residual) of ``y ≈ a_source + b_target`` over the given pairs.

    >>> effects, rmse = source_effects(["a", "b", "a", "b"], ["t", "t", "u", "u"], [1.0, 2.0, 3.0, 4.0])
    >>> round(effects["b"] - effects["a"], 12), round(rmse, 12)
    (1.0, 0.0)
    """
    known = pd.DataFrame({"s": np.asarray(sources).astype(str), "t": np.asarray(targets).astype(str),
                          "y": np.asarray(y, dtype=np.float64)})
    b = pd.Series(0.0, index=sorted(known["t"].unique()))
    for _ in range(sweeps):
        a = (known["y"] - known["t"].map(b)).groupby(known["s"]).mean()
        b_new = (known["y"] - known["s"].map(a)).groupby(known["t"]).mean()
        b_new -= b_new.mean()
        done = float((b_new - b).abs().max()) < tol
        b = b_new
        if done:
            break
    a = (known["y"] - known["t"].map(b)).groupby(known["s"]).mean()
    residual = known["y"] - known["s"].map(a) - known["t"].map(b)
    return {str(k): float(v) for k, v in a.items()}, float(np.sqrt(np.mean(residual ** 2)))


def known_effects(known: pd.DataFrame, outcome: str) -> tuple[dict[str, float], float, int]:
    """(source → a_s, rms residual, pairs used) of :func:`source_effects` over the known pairs with a finite
    ``outcome`` (derived columns such as ``ermse_norm`` added by :func:`diag.stats.with_normalised`).

    Raises:
        DataError: fewer than 3 such pairs.
    """
    table = with_normalised(known)
    y = pd.to_numeric(table[outcome], errors="coerce").to_numpy(np.float64) if outcome in table else np.array([])
    ok = np.isfinite(y)
    if ok.sum() < 3:
        raise DataError(f"need at least 3 pairs with a finite '{outcome}' to fit, got {int(ok.sum())}")
    effects, rmse = source_effects(table.loc[ok, "source"], table.loc[ok, "target"], y[ok])
    return effects, rmse, int(ok.sum())


def record_note(known: pd.DataFrame, sources, outcome: str = "ermse_norm") -> str:
    """One line for a ranking: each candidate source's effect on ``outcome`` (E-RMSE ÷ θ_ftᵀ's; lower is better)
    over the known pairs without the target, best first; sources with no known pair are named apart."""
    try:
        effects, _, _ = known_effects(known, outcome)
    except DataError:
        return f"source record: fewer than 3 known pairs with {outcome}"
    centre = float(np.mean(list(effects.values())))
    have = sorted((s for s in sources if s in effects), key=lambda s: effects[s])
    missing = [s for s in sources if s not in effects]
    return ("source record on the other targets (effect on E-RMSE ÷ θ_ftᵀ's, additive source + target fit; lower "
            "is better; the best data-free ranker leave one target out on the mini-suite): "
            + ", ".join(f"{s} {effects[s] - centre:+.3f}" for s in have)
            + (f"; no known pair: {', '.join(missing)}" if missing else ""))


# ---------------------------------------------------------------------------- known pairs


#: Fewest known pairs without the target to fit the ranker (below: the cos(τ_ftˢ, τ_ftᵀ) proxy).
MIN_TRAINING_PAIRS = 4


def distinct_pairs(table: pd.DataFrame) -> int:
    """How many distinct (source, target) pairs ``table`` holds (a pair's seed replicates count once): what
    :data:`MIN_TRAINING_PAIRS` counts."""
    return int(table[["source", "target"]].drop_duplicates().shape[0]) if len(table) else 0


def training_pairs(table: pd.DataFrame, target: str) -> pd.DataFrame:
    """Known pairs usable to rank sources for ``target``: none that involve the target."""
    return table[(table["target"] != target) & (table["source"] != target)].copy()
