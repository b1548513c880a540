"""Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff 2021)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diag.curvature.probes import _dim, _matmul, rademacher
from diag.curvature.results import TraceEstimate

__all__ = ["hutchpp_trace"]


def _apply_blocks(A, V: Tensor, block_size: int) -> Tensor:
    return torch.cat([_matmul(A, V[:, s:s + block_size]) for s in range(0, V.shape[1], block_size)], dim=1)


def hutchpp_trace(A, num_matvecs: int, seed: int = 0, block_size: int = 8) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) trace estimate.

    With ``k = num_matvecs // 3``: sketch ``Q = orth(A S)`` from ``k`` Rademacher
    probes, then ``tr(A) ≈ tr(Qᵀ A Q) + (1/k) Σ_j g_jᵀ (I−QQᵀ) A (I−QQᵀ) g_j`` with
    ``k`` fresh probes ``g_j``. The low-rank part is exact given ``Q``; the standard
    error is that of the Hutchinson part, ``s/√k`` (conditional on ``Q``, where the
    estimator is unbiased). For PSD ``A`` it needs O(1/ε) products for relative error
    ε instead of Hutchinson's O(1/ε²).

    Args:
        A: Symmetric operator ``(D, D)``.
        num_matvecs: Total products (at least 3; rounded down to a multiple of 3).
        seed: Probe stream: ``S`` uses probes ``0..k-1``, ``g`` probes ``k..2k-1``.
        block_size: Columns per product.

    Returns:
        :class:`TraceEstimate` with ``method="hutch++"``; ``probe_values`` are the
        ``k`` conditional estimates ``tr(QᵀAQ) + g_jᵀ(I−P)A(I−P)g_j``.
    """
    D = _dim(A)
    k = num_matvecs // 3
    if k < 1:
        raise ValueError(f"hutchpp_trace needs num_matvecs >= 3, got {num_matvecs}")
    k_sketch = min(k, D)
    S = torch.stack([rademacher(D, seed, i) for i in range(k_sketch)], dim=1).to(A.device)
    G = torch.stack([rademacher(D, seed, k + i) for i in range(k)], dim=1).to(A.device)
    Q, _ = torch.linalg.qr(_apply_blocks(A, S, block_size))
    low = float(torch.einsum("ij,ij->", Q, _apply_blocks(A, Q, block_size)))
    Gp = G - Q @ (Q.T @ G)
    x = torch.einsum("ij,ij->j", Gp, _apply_blocks(A, Gp, block_size)).cpu()
    sd = float(x.std(unbiased=True)) if k > 1 else math.nan
    return TraceEstimate(low + float(x.mean()), sd / math.sqrt(k) if k > 1 else math.nan,
                         2 * k_sketch + k, "hutch++", k, low + x, seed)


