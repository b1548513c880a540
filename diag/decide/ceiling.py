"""The test-retest ceiling of source ranking: how well one training seed's measured ranking predicts another's.

A ranker is judged by the leave-one-target-out Spearman between its predicted and the measured
per-source E-RMSE of each target. No ranker can be expected to beat the agreement of the
measurement with itself: per target T, the Spearman between the per-source E-RMSE of T measured
on training seed a and on seed b (same pairs, vectors and φ retrained), averaged over seed pairs
and then over targets (± its standard error over targets). When the ceiling is low, the sources'
differences are within seed noise: a finding about the testbed, not a failure of any ranker.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pandas as pd

from diag.stats import spearman


@dataclass(frozen=True)
class RankingCeiling:
    """Per target the mean between-seed Spearman of the measured E-RMSE over sources; their mean ± se.

    Attributes:
        per_target: target → mean over seed pairs of the Spearman (targets with < 3 shared sources skipped).
        mean, se: over targets (se: sd with ddof 1 over √n).
        seeds: the training seeds compared.
    """

    per_target: dict[str, float]
    mean: float
    se: float
    seeds: tuple[int, ...]

    def fraction(self, spearman_of_ranker: float) -> float:
        """A ranker's mean LOTO Spearman as a fraction of the ceiling (NaN when the ceiling is ≤ 0)."""
        return spearman_of_ranker / self.mean if self.mean > 0 else float("nan")

    def sentence(self) -> str:
        head = (f"test-retest ceiling (Spearman of the measured per-source E-RMSE between training seeds "
                f"{', '.join(map(str, self.seeds))}, per target, averaged): {self.mean:.3f} ± {self.se:.3f} over "
                f"{len(self.per_target)} targets")
        if self.mean < 0.5:
            head += ("; below 0.5: on this testbed the sources' differences are largely seed noise, which bounds "
                     "what any ranker can find")
        return head

    def to_dict(self) -> dict:
        return {"per_target": self.per_target, "mean": self.mean, "se": self.se, "seeds": list(self.seeds)}


def ranking_ceiling(table: pd.DataFrame, metric: str = "ermse") -> RankingCeiling | None:
    """The :class:`RankingCeiling` of a study table holding ≥ 2 training seeds (one λ2, one method); None otherwise."""
    seeds = sorted(int(s) for s in table["seed"].unique()) if "seed" in table.columns else []
    if len(seeds) < 2:
        return None
    per_target = {}
    for target, part in table.groupby("target", sort=True):
        wide = part.pivot_table(index="source", columns="seed", values=metric, aggfunc="mean")
        values = []
        for a, b in itertools.combinations([s for s in seeds if s in wide.columns], 2):
            both = wide[[a, b]].dropna()
            if len(both) >= 3 and both[a].nunique() > 1 and both[b].nunique() > 1:
                values.append(spearman(both[a].to_numpy(), both[b].to_numpy()).statistic)
        if values:
            per_target[str(target)] = float(sum(values) / len(values))
    if not per_target:
        return None
    v = pd.Series(per_target, dtype=float)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return RankingCeiling(per_target, float(v.mean()), se, tuple(seeds))
