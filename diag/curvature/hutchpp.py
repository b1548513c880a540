"""Hutch++ trace estimator (Meyer, Musco, Musco & Woodruff 2021)."""

from __future__ import annotations

import math

import torch

from diag.curvature.probes import MEMORY_SHARE, _dim, _matmul, free_memory_bytes, probe_block
from diag.curvature.results import TraceEstimate
from train.errors import TvdiagError

__all__ = ["hutchpp_trace"]


def fitting_block(D: int, k: int, block_size: int, free_bytes: int, share: float = MEMORY_SHARE) -> int:
    """The largest block (at most ``block_size``) with which Hutch++ holds ``Q`` and one block's
    three ``(D, b)`` temporaries — ``(k + 3b) · D`` float64 numbers, and ``2k · D`` during the
    QR of the sketch — within ``share · free_bytes``.

    Raises:
        TvdiagError: when even ``b = 1`` does not fit (names the memory needed and the fix).
    """
    columns = int(share * free_bytes // (8 * D))
    b = min(block_size, (columns - k) // 3)
    if b < 1 or 2 * k > columns:
        raise TvdiagError(f"Hutch++ with {k} sketch probes over {D:,} parameters needs "
                          f"{max(k + 3, 2 * k) * D * 8 / 2**30:.1f} GiB, more than {share:.0%} of the "
                          f"{free_bytes / 2**30:.1f} GiB free: use fewer probes (3 per sketch column) or Hutchinson")
    return b


def hutchpp_trace(A, num_matvecs: int, seed: int = 0, block_size: int = 8) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) trace estimate.

    With ``k = num_matvecs // 3``: sketch ``Q = orth(A S)`` from ``k`` Rademacher
    probes, then ``tr(A) ≈ tr(Qᵀ A Q) + (1/k) Σ_j g_jᵀ (I−QQᵀ) A (I−QQᵀ) g_j`` with
    ``k`` fresh probes ``g_j``. The low-rank part is exact given ``Q``; the standard
    error is that of the Hutchinson part, ``s/√k`` (conditional on ``Q``, where the
    estimator is unbiased). For PSD ``A`` it needs O(1/ε) products for relative error
    ε instead of Hutchinson's O(1/ε²).

    Memory: the probes are drawn ``block_size`` at a time and every product is used as
    it comes, so the run holds the sketch ``A S`` and its ``Q`` (two ``(D, k)`` float64
    matrices, while the QR runs; then ``Q`` alone) plus one block — 88M parameters × 33
    sketch columns is 23 GB per matrix, so size ``num_matvecs`` to the machine. The block
    shrinks when ``Q`` and a block's temporaries would not fit in
    :data:`~diag.curvature.probes.MEMORY_SHARE` of the free memory
    (:func:`fitting_block`; same estimate, other blocking).

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
    block_size = fitting_block(D, k_sketch, block_size, free_memory_bytes(A.device))
    starts = range(0, k_sketch, block_size)
    Q = torch.empty(D, k_sketch, dtype=torch.float64, device=A.device)
    for s in starts:  # the sketch A S, one block of probes at a time
        b = min(block_size, k_sketch - s)
        Q[:, s:s + b] = _matmul(A, probe_block(D, seed, range(s, s + b), device=A.device))
    Q = torch.linalg.qr(Q).Q
    low = sum(float(torch.einsum("ij,ij->", Q[:, s:s + block_size], _matmul(A, Q[:, s:s + block_size])))
              for s in starts)
    parts = []
    for s in range(0, k, block_size):  # the deflated Hutchinson part, one block of fresh probes at a time
        G = probe_block(D, seed, range(k + s, k + min(s + block_size, k)), device=A.device)
        G -= Q @ (Q.T @ G)
        parts.append(torch.einsum("ij,ij->j", G, _matmul(A, G)).cpu())
    x = torch.cat(parts)
    sd = float(x.std(unbiased=True)) if k > 1 else math.nan
    return TraceEstimate(low + float(x.mean()), sd / math.sqrt(k) if k > 1 else math.nan,
                         2 * k_sketch + k, "hutch++", k, low + x, seed)


