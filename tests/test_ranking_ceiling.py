"""The test-retest ceiling of source ranking, on tables whose answer is known by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from diag.decide.ceiling import ranking_ceiling


def _table(per_seed: dict[int, dict[str, list[float]]]) -> pd.DataFrame:
    """seed → target → E-RMSE of sources s0, s1, … (in that order)."""
    rows = [{"seed": seed, "target": t, "source": f"s{i}", "ermse": v}
            for seed, targets in per_seed.items() for t, values in targets.items() for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_identical_and_reversed_rankings_give_plus_and_minus_one():
    table = _table({0: {"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 2.0, 3.0, 4.0]},
                    1: {"a": [1.1, 2.5, 2.9, 9.0], "b": [4.0, 3.0, 2.0, 1.0]}})
    c = ranking_ceiling(table)
    assert c.per_target == {"a": pytest.approx(1.0), "b": pytest.approx(-1.0)}
    assert c.mean == pytest.approx(0.0) and c.se == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert c.seeds == (0, 1) and "below 0.5" in c.sentence()
    assert math.isnan(c.fraction(0.3))


def test_three_seeds_average_the_seed_pairs_and_one_seed_has_no_ceiling():
    # seeds 0, 1 agree (ρ = 1); seed 2 swaps the first two sources: ρ(0,2) = ρ(1,2) = 1 − 6·2/(4·15) = 0.8
    table = _table({0: {"a": [1, 2, 3, 4]}, 1: {"a": [1, 2, 3, 4]}, 2: {"a": [2, 1, 3, 4]}})
    c = ranking_ceiling(table)
    assert c.per_target["a"] == pytest.approx((1 + 0.8 + 0.8) / 3)
    assert c.fraction(0.5) == pytest.approx(0.5 / c.mean)
    assert ranking_ceiling(table[table["seed"] == 0]) is None
