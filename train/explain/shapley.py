"""Exact Shapley values of patch coalitions by enumerating all 2^M coalitions.

For players ``N = {0..M-1}`` and value function ``v``,

    phi_i = sum_{S ⊆ N \\ {i}} |S|! (M - |S| - 1)! / M! * (v(S ∪ {i}) - v(S)),

which satisfies efficiency ``sum_i phi_i = v(N) - v(∅)``. This is the reference
that :func:`train.explain.kernelshap.kernel_shap` must converge to; it costs
``2^M`` forwards per image, so it is limited to ``M <= 16``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from train.errors import TvdiagError
from train.explain.masking import coalition_values, patch_grid

MAX_PLAYERS = 16

__all__ = ["MAX_PLAYERS", "all_coalitions", "shapley_from_table", "exact_shapley"]


def all_coalitions(m: int, device: torch.device | str | None = None) -> Tensor:
    """All ``2^m`` coalitions as a (2^m, m) bool tensor; row ``k`` holds the bits of ``k``.

    Row ``k`` contains player ``i`` iff ``(k >> i) & 1``; row 0 is ∅, row ``2^m - 1`` is N.
    """
    k = torch.arange(2 ** m, device=device)
    return ((k[:, None] >> torch.arange(m, device=device)) & 1).bool()


def shapley_from_table(table: Tensor) -> Tensor:
    """Shapley values from a full value table.

    Args:
        table: (B, 2^M) values, column ``k`` = ``v`` of the coalition whose bits are ``k``
            (the row order of :func:`all_coalitions`).

    Returns:
        (B, M) float64 Shapley values.

    Example (majority game of 3 players: ``v(S) = 1`` iff ``|S| >= 2``, so phi = 1/3 each):
        >>> sizes = all_coalitions(3).sum(1)
        >>> shapley_from_table((sizes >= 2).double()[None])
        tensor([[0.3333, 0.3333, 0.3333]], dtype=torch.float64)
    """
    table = table.double()
    n = table.shape[-1]
    m = n.bit_length() - 1
    if n != 2 ** m or m < 1:
        raise TvdiagError(f"value table must have 2^M >= 2 columns, got {n}")
    k = torch.arange(n, device=table.device)
    sizes = all_coalitions(m, table.device).sum(1)
    # weight of a coalition S (not containing i) of size s: s! (M-s-1)! / M!
    s = torch.arange(m, dtype=torch.float64, device=table.device)
    log_w = torch.lgamma(s + 1) + torch.lgamma(m - s) - math.lgamma(m + 1)
    w = torch.exp(log_w)
    phi = torch.empty(table.shape[0], m, dtype=torch.float64, device=table.device)
    for i in range(m):
        with_i = k[(k >> i) & 1 == 1]
        diff = table[:, with_i] - table[:, with_i ^ (1 << i)]
        phi[:, i] = diff @ w[sizes[with_i] - 1]
    return phi


def exact_shapley(predict: Callable[[Tensor], Tensor], images: Tensor, targets: Tensor,
                  patch_size: int, baseline: float | Tensor = 0.0, batch_size: int = 2048,
                  output: str = "logit") -> Tensor:
    """Exact Shapley values of the patches of each image by enumeration.

    The value of a coalition ``S`` is the target output of ``predict`` on the image with
    the patches outside ``S`` replaced by ``baseline`` (see :mod:`train.explain.masking`).

    Args:
        predict: maps images (N, C, H, W) to logits (N, K).
        images: (B, C, H, W) images.
        targets: (B,) long target classes.
        patch_size: patch side in pixels; ``M = (H/p)(W/p) <= 16``.
        baseline: value of removed patches (0 = dataset mean in normalised space).
        batch_size: maximum images per forward.
        output: ``"logit"`` or ``"prob"``.

    Returns:
        (B, M) float64 Shapley values; rows sum to ``v(N) - v(∅)``.

    Raises:
        TvdiagError: ``M > 16`` or bad shapes.
    """
    gh, gw = patch_grid(images, patch_size)
    m = gh * gw
    if m > MAX_PLAYERS:
        raise TvdiagError(f"exact Shapley enumerates 2^M coalitions; M = {m} > {MAX_PLAYERS}")
    masks = all_coalitions(m, images.device)
    table = coalition_values(predict, images, targets, masks, patch_size, baseline,
                             batch_size, output)
    return shapley_from_table(table)
