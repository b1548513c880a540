"""Exact diagonal and trace of a symmetric curvature operator, from D products with unit vectors.

The reference every stochastic estimator is checked against on small problems; under
``torch.distributed`` the unit-vector chunks are split over the ranks and summed.
"""

from __future__ import annotations

import math

import torch

from diag.curvature.probes import _dim, _matmul, _progress_bar, _split
from diag.curvature.results import DiagonalEstimate, TraceEstimate
from diag.runtime.distributed import all_reduce_sum

__all__ = ["exact_diagonal", "exact_trace"]



def exact_diagonal(A, chunk_size: int = 32, progress: bool | None = None,
                   split_probes: bool | None = None) -> DiagonalEstimate:
    """``diag(A)`` from D products with unit vectors: ``A_ii = e_iᵀ A e_i``.

    Columns are multiplied ``chunk_size`` at a time as ``(D, k)`` blocks; under
    ``torch.distributed`` chunk ``c`` goes to rank ``c % W`` and the result is summed.

    Args:
        A: Symmetric operator of shape ``(D, D)``.
        chunk_size: Unit vectors per product.
        progress: Show a tqdm bar.
        split_probes: Split chunks over ranks (default: when distributed and the
            operator is not data-parallel).

    Returns:
        A :class:`DiagonalEstimate` with ``method="exact"`` and zero standard errors.

    Example:
        >>> import torch
        >>> class M:  # any object with shape/dtype/device/@
        ...     def __init__(s, a): s.a, s.shape, s.dtype, s.device = a, a.shape, a.dtype, a.device
        ...     def __matmul__(s, v): return s.a @ v
        >>> exact_diagonal(M(torch.tensor([[2., 1.], [1., 3.]], dtype=torch.float64))).mean.tolist()
        [2.0, 3.0]
    """
    D = _dim(A)
    rank, world = _split(A, split_probes)
    diag = torch.zeros(D, dtype=torch.float64, device=A.device)
    n_chunks = math.ceil(D / chunk_size) if D else 0
    bar = _progress_bar(progress and rank == 0, D, "exact diagonal")
    n_matvecs = 0
    for c in range(n_chunks):
        start, stop = c * chunk_size, min(D, (c + 1) * chunk_size)
        if c % world == rank:
            k = stop - start
            E = torch.zeros(D, k, dtype=A.dtype, device=A.device)
            cols = torch.arange(k, device=A.device)
            E[start + cols, cols] = 1
            AE = _matmul(A, E)
            diag[start:stop] = AE[start + cols, cols]
        n_matvecs += stop - start
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    if world > 1:
        diag = all_reduce_sum(diag)
    total = float(diag.sum())
    return DiagonalEstimate(diag, torch.zeros_like(diag), n_matvecs, total, 0.0, "exact", 0)


def exact_trace(A, chunk_size: int = 32, progress: bool | None = None) -> TraceEstimate:
    """``tr(A) = Σ_i e_iᵀ A e_i`` exactly (D products); ``stderr = 0``."""
    d = exact_diagonal(A, chunk_size=chunk_size, progress=progress)
    return TraceEstimate(d.total, 0.0, d.n_matvecs, "exact", 0)
