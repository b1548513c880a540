"""The accuracy budget, measured: eq. 8 over the λ2 grid on the target's ``val`` images, and the
one rule that picks a size from it.

The rule (:func:`safe_sizes`, :func:`recommend_lambda2`): a size is safe when its accuracy drop
stays within the budget *and so does every smaller size of the same family*; the choice is the
largest safe size (0.0 when even the smallest fails). Val accuracy is measured on a few hundred
images and is not monotone in λ2, so a lucky measurement above an unsafe one (drops .01, .02,
.07, .03 at λ2 0.4 … 0.7 with a 5 % budget) does not make 0.7 safe: the rule gives 0.5. Every
choice of a size — plain eq. 8's λ2 (``screen``, ``rank-sources``, the study's chosen λ2) and
each transfer method's knob (:mod:`diag.transfer.select`) — goes through it.

``test`` is never read here: it is only ever scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from diag.constants import CHECK_IMAGES, CHOICE_SPLIT, LAMBDA_GRID, PAPER_LAMBDA1
from diag.runtime.context import Workspace
from diag.stats.paired import paired_change, paired_drop
from diag.transfer.eq8 import correct_and_loss, transferred_state
from train.errors import DataError

__all__ = ["accuracy_grid", "drop_at", "recommend_lambda2", "safe_sizes"]

#: Tolerance of "within budget" (float noise of a drop computed from two accuracies).
BUDGET_TOL = 1e-9


def safe_sizes(sizes: Sequence[float], drops: Sequence[float], budget: float) -> np.ndarray:
    """Per entry: its drop and the drop of every smaller (or equal) size are within ``budget``.

    Args:
        sizes: the sizes of one family (λ2, or a method's scale); any order, no NaN.
        drops: accuracy drop at each size (1 − acc / acc(θ_ftᵀ) on ``val``); NaN counts as over.
        budget: the largest drop allowed, ≥ 0.

    Returns:
        Boolean array in the input order.

    Raises:
        DataError: lengths differ or the budget is negative.
    """
    sizes, drops = np.asarray(sizes, dtype=float), np.asarray(drops, dtype=float)
    if sizes.shape != drops.shape:
        raise DataError(f"{sizes.size} sizes but {drops.size} drops")
    if not budget >= 0:
        raise DataError(f"the accuracy budget must be >= 0, got {budget}")
    order = np.argsort(sizes, kind="stable")
    keeps = drops[order] <= budget + BUDGET_TOL  # NaN compares False
    safe_sorted = np.logical_and.accumulate(keeps) if keeps.size else keeps
    # equal sizes share one verdict: the worst of their rows
    s_sorted = sizes[order]
    for value in np.unique(s_sorted):
        same = s_sorted == value
        safe_sorted[same] = safe_sorted[same].all()
    out = np.empty_like(safe_sorted)
    out[order] = safe_sorted
    return out


def recommend_lambda2(grid: pd.DataFrame, max_acc_drop: float) -> float:
    """The largest safe λ2 of a measured grid (:func:`safe_sizes`); 0.0 if none.

    Rows sharing a λ2 (seeds, α values) are averaged first.

    Raises:
        DataError: no ``lambda2`` / ``acc_drop`` column, or a negative budget.
    """
    if not {"lambda2", "acc_drop"} <= set(grid.columns):
        raise DataError("the λ2 grid needs 'lambda2' and 'acc_drop' columns")
    if max_acc_drop < 0:
        raise DataError(f"max_acc_drop must be >= 0, got {max_acc_drop}")
    per = grid.groupby("lambda2")["acc_drop"].mean()
    safe = safe_sizes(per.index.to_numpy(dtype=float), per.to_numpy(dtype=float), max_acc_drop)
    return float(per.index[safe].max()) if safe.any() else 0.0


def accuracy_grid(ws: Workspace, target: str, sources: Sequence[str], lambda1: float = PAPER_LAMBDA1,
                  grid: Sequence[float] = LAMBDA_GRID, n_images: int = CHECK_IMAGES) -> pd.DataFrame:
    """Measured accuracy of eq. 8 over a λ2 grid on the target's labelled ``val`` images (tier 2).

    Returns:
        Rows (source, lambda2, accuracy, acc_drop, acc_drop_se, n_val, n_lost, n_gained, loss_increase,
        loss_increase_se) with
        acc_drop = 1 − acc/acc(θ_ftᵀ), its paired standard error over the same images
        (:func:`diag.stats.paired.paired_drop`: ``n_lost``/``n_gained`` images the vector makes
        wrong/right) and loss_increase the val cross-entropy minus θ_ftᵀ's (what the loss model
        λ·gᵀτ + ½λ²R predicts; loss_increase_se its paired standard error); ``attrs["accuracy_ft_target"]`` is θ_ftᵀ's accuracy on the same images.
    """
    images = ws.target_set(target, CHOICE_SPLIT, n_images)
    ft_t = ws.vector(target, "ft")
    base_correct, base_loss = correct_and_loss(ws, target, ws.state(ft_t), images)
    base_acc = float(base_correct.double().mean())
    rows = []
    for source in sources:
        star = ws.vector(source, "star")
        for lam in grid:
            correct, loss = correct_and_loss(ws, target, transferred_state(ws, ft_t, star, lambda1, lam), images)
            acc, paired = float(correct.double().mean()), paired_drop(base_correct.numpy(), correct.numpy())
            change, change_se = paired_change(base_loss.numpy(), loss.numpy())
            rows.append({"source": source, "lambda2": float(lam), "accuracy": acc,
                         "acc_drop": 1.0 - acc / max(base_acc, 1e-12), "acc_drop_se": paired.se, "n_val": paired.n,
                         "n_lost": paired.n_lost, "n_gained": paired.n_gained, "loss_increase": change,
                         "loss_increase_se": change_se})
    out = pd.DataFrame(rows)
    out.attrs["accuracy_ft_target"] = base_acc
    return out


def drop_at(grid: pd.DataFrame, lam: float, column: str = "acc_drop") -> float:
    """Measured drop of the grid at ``lam`` (``column``: ``acc_drop_se`` or ``n_val`` for its standard error
    and image count; NaN when the grid does not hold it)."""
    hit = grid[(grid["lambda2"] - lam).abs() < 1e-9]
    return float(hit[column].mean()) if len(hit) and column in hit else math.nan
