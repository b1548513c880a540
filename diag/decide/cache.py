"""The store's cache of source rankings, keyed by everything a ranking is computed from.

A second ``rank-sources`` call with the same inputs reads the stored ranking
(``studies/rankings/<target>-tier<t>-<key>.json``) instead of reloading θ_base and recomputing
the risks and the tier-2 accuracy grid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict

import pandas as pd

from diag.constants import DEFAULT_MAX_ACC_DROP, PAPER_LAMBDA1, PREDICTION_LEVEL
from diag.decide.predictor import RANKER
from diag.decide.ranking import SourceRanking, rank_for_target
from diag.features.pair_features import Diagnostics
from diag.table import artifact_key
from train.store import content_key
from train.tensorio import atomic_write_bytes

__all__ = ["RANKING_VERSION", "rank_cached", "ranking_key"]

RANKING_VERSION = 5


def ranking_key(diag: Diagnostics, table: pd.DataFrame, target: str, sources: list[str], tier: int,
                max_acc_drop: float, model: str, lambda1: float, methods: Sequence[str] | None = None,
                level: float = PREDICTION_LEVEL, known: pd.DataFrame | None = None) -> str:
    """Content key of a ranking: every input it is computed from, read from file headers only.

    The known pairs (sha256 of the table rows), the content keys of θ_ft and θ_ft* of the
    target and every source (these carry the base, the data and the training settings), the
    curvature settings, and the decision's own arguments.
    """
    store = diag.store
    vectors = {d: [artifact_key(store.vector_path(d, "ft")), artifact_key(store.vector_path(d, "ftx", diag.alpha))]
               for d in sorted({*sources, target})}
    rows = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    if known is not None:  # the predictors' own known pairs
        rows += hashlib.sha256(known.to_csv(index=False).encode()).hexdigest()
    return content_key({"target": target, "sources": list(sources), "tier": int(tier), "budget": float(max_acc_drop),
                        "model": model, "lambda1": float(lambda1), "alpha": diag.alpha, "base": diag.base_hash,
                        "vectors": vectors, "table": rows, "curvature": asdict(diag.settings) if tier >= 1 else None,
                        "data": str(diag.data.get(target, "")), "version": RANKING_VERSION,
                        "methods": list(methods) if methods is not None else None, "level": float(level)})


def rank_cached(diag: Diagnostics, table: pd.DataFrame, target: str, sources: list[str], tier: int,
                max_acc_drop: float = DEFAULT_MAX_ACC_DROP, model: str = RANKER,
                lambda1: float = PAPER_LAMBDA1, methods: Sequence[str] | None = None,
                level: float = PREDICTION_LEVEL, known: pd.DataFrame | None = None) -> SourceRanking:
    """:func:`rank_for_target`, cached in the store under its :func:`ranking_key` (``studies/rankings/``).

    A second call with the same inputs reads the stored ranking instead of reloading θ_base,
    recomputing the risks and the tier-2 accuracy grid.
    """
    key = ranking_key(diag, table, target, sources, tier, max_acc_drop, model, lambda1, methods, level, known)
    path = diag.store.study_dir("rankings") / f"{target}-tier{tier}-{key}.json"
    if path.is_file():
        return SourceRanking.from_json(path.read_text(), path)
    ranking = rank_for_target(diag, table, target, sources, tier, max_acc_drop, model=model, lambda1=lambda1,
                              methods=methods, level=level, known=known)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ranking.to_json().encode())
    return ranking
