"""Curvature-aware repairs of an explainability vector: eigen-projection and diagonal preconditioning.

Adding λ·τ to the target at θ_ftᵀ raises its classification loss by about ½ λ² τᵀ Hᵀ τ
(paper eq. 12; :mod:`diag.decide.rules`). Each function here changes τ so that it keeps as much of
itself as possible while that quadratic cost falls. They are pure: flat float tensors (or
:class:`~train.vectors.TaskVector` for the mixes) in, the repaired vector out, nothing read
from disk and no target data touched. The curvature objects are the ones of
:mod:`diag.curvature`: an operator with ``op @ v``, a Hutchinson diagonal, the top-k
eigenpairs of a :class:`~diag.curvature.card.HessianCard` or an ``EigenResult``.

* :func:`project`: remove the top-k eigen-directions of Hᵀ (tier 1 with a card, tier 2);
* :func:`precondition`: shrink each coordinate by its curvature (tier 1, the card's diagonal);
* per-block coefficients (:mod:`diag.transfer.blocks`) and multi-source mixes
  (:mod:`diag.transfer.mixing`) live beside this module.

Flat vectors follow a :class:`~diag.curvature.params.ParamLayout` (the operator's or the
card's); :func:`flat_of` and :func:`with_flat` move between a TaskVector and that order, leaving
the vector's tensors outside the layout untouched.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from train.errors import BaseMismatchError, TvdiagError
from train.vectors import TaskVector

#: Grid of the preconditioning strength c (curvature relative to its mean).
PRECONDITION_GRID: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
#: Grid of the share of the positive risk carried by the projected eigen-directions.
SHARE_GRID: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)

__all__ = [
    "PRECONDITION_GRID",
    "SHARE_GRID",
    "flat_of",
    "with_flat",
    "eigen_basis",
    "project",
    "choose_k_by_share",
    "card_diagonal",
    "precondition",
]



# ------------------------------------------------------------------------ flat <-> vectors


def flat_of(tau: TaskVector, layout) -> Tensor:
    """τ restricted to ``layout``'s parameters as one float64 ``(D,)`` vector, in the layout's order."""
    return layout.flatten(tau.tensors, dtype=torch.float64)


def with_flat(tau: TaskVector, flat: Tensor, layout, how: str) -> TaskVector:
    """A copy of τ whose ``layout`` tensors are replaced by ``flat`` (others unchanged).

    Args:
        tau: the vector repaired.
        flat: ``(D,)`` replacement in ``layout``'s order.
        layout: a :class:`~diag.curvature.params.ParamLayout` (``op.layout``, ``card.layout``).
        how: provenance note of the repair (stored as ``derived``).
    """
    parts = layout.unflatten(flat.reshape(-1))
    tensors = dict(tau.tensors)
    for name, value in parts.items():
        if name not in tensors:
            raise BaseMismatchError(f"The vector has no parameter '{name}' of the curvature layout")
        tensors[name] = value.detach().to(dtype=tensors[name].dtype, device=tensors[name].device).clone()
    return TaskVector(tensors, tau.base_hash, {"derived": how})


def flat(tau: Tensor) -> Tensor:
    return tau.detach().reshape(-1).double()


# ------------------------------------------------------------------------- eigen-projection


def eigen_basis(eig, dim: int) -> tuple[Tensor | None, Tensor]:
    """``(eigvals or None, U (D, k))`` from a HessianCard / EigenResult or an eigenvector tensor.

    A tensor may hold the vectors as columns ``(D, k)`` (the convention of the card and of
    :func:`~diag.curvature.risk.eigen_contributions`) or as rows ``(k, D)``; a square tensor is
    read as columns.
    """
    if hasattr(eig, "eigvecs"):
        return eig.eigvals.double(), eig.eigvecs.double()
    U = eig.double()
    if U.ndim == 1:
        U = U[:, None]
    if U.ndim != 2 or dim not in U.shape:
        raise BaseMismatchError(f"eigenvectors of shape {tuple(eig.shape)} do not fit a vector of length {dim}")
    return None, (U if U.shape[0] == dim else U.T)


def project(tau: Tensor, eigvecs, k: int | None = None) -> Tensor:
    """Remove τ's components along the top-k eigenvectors of Hᵀ.

    Objective: the vector closest to τ (in ‖·‖₂) that is orthogonal to the k most curved
    directions, τ̃ = τ − Σ_{i≤k} (vᵢᵀτ) vᵢ = (I − VₖVₖᵀ) τ. Its risk is
    R(τ̃) = τᵀHτ − Σ_{i≤k} λᵢ aᵢ² (aᵢ = vᵢᵀτ; exact when the vᵢ are exact eigenvectors), i.e.
    the removed eigen-contributions of eq. 19, at the price of ‖τ − τ̃‖² = Σ_{i≤k} aᵢ².

    Args:
        tau: ``(D,)`` flat vector.
        eigvecs: orthonormal eigenvectors in descending eigenvalue order: a ``(D, k)``/``(k, D)``
            tensor, a HessianCard or an EigenResult.
        k: how many to remove (default all given).

    Returns:
        float64 ``(D,)`` τ̃.
    """
    t = flat(tau)
    _, U = eigen_basis(eigvecs, t.shape[0])
    k = U.shape[1] if k is None else int(k)
    if not 0 <= k <= U.shape[1]:
        raise TvdiagError(f"k={k} must lie in 0..{U.shape[1]} (the eigenvectors given)")
    Uk = U[:, :k].to(t.device)
    return t - Uk @ (Uk.T @ t)


def choose_k_by_share(eigvals: Tensor, eigvecs, tau: Tensor, share: float) -> int:
    """Smallest k whose eigen-contributions λᵢaᵢ² (i ≤ k) carry ≥ ``share`` of the positive risk.

    The positive risk is Σᵢ max(λᵢaᵢ², 0) over the given pairs (negative-curvature directions
    lower the loss and are never worth removing). Returns 0 when no pair has positive
    contribution, and the number of pairs when the share is never reached.
    """
    if not 0 <= share <= 1:
        raise TvdiagError(f"share must lie in [0, 1], got {share}")
    t = flat(tau)
    _, U = eigen_basis(eigvecs, t.shape[0])
    contrib = (eigvals.double().to(t.device) * (U.T.to(t.device) @ t).pow(2)).clamp_min(0)
    total = float(contrib.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(contrib, 0) / total
    hit = torch.nonzero(cum >= share - 1e-12)
    return int(hit[0]) + 1 if len(hit) else int(contrib.shape[0])


# ---------------------------------------------------------------------- preconditioning


def card_diagonal(card) -> Tensor:
    """diag(Hᵀ) from a HessianCard: residual diagonal + Σᵢ lᵢ vᵢ² (exact diagonal of the card's model)."""
    return card.residual_diag.double() + card.eigvecs.double().pow(2) @ card.eigvals.double()


def precondition(tau: Tensor, diag: Tensor, c: float) -> Tensor:
    """Shrink τ coordinate-wise by the target's curvature: τ̃ᵢ = τᵢ / (1 + c·hᵢ/h̄).

    hᵢ = max(diag(Hᵀ)ᵢ, 0) (a Hutchinson estimate can be negative) and h̄ = mean h.

    Objective: τ̃ minimises ‖x − τ‖² + (c/h̄)·xᵀ diag(h) x (a negative log posterior), i.e. it is
    the MAP of a Gaussian prior centred at τ with unit precision, combined with the target's
    diagonal Laplace approximation N(0, (c·diag(h)/h̄)⁻¹) around θ_ftᵀ (the target's loss says
    "stay near 0 where I am curved"). Relation to Fisher merging (Matena & Raffel 2022):
    there the merge is θ = Σₛ Fₛθₛ / Σₛ Fₛ, a precision-weighted average of all models. Here
    only the target brings a precision (its curvature) and the other end is τ with a flat
    precision, so the merge is a one-sided shrinkage of τ toward 0 exactly in the directions
    the target's loss is curved; flat directions pass unchanged. c = 0 returns τ.

    Args:
        tau: ``(D,)``.
        diag: ``(D,)`` diagonal of Hᵀ (e.g. :func:`card_diagonal` or a Hutchinson mean).
        c: strength ≥ 0 (grid :data:`PRECONDITION_GRID`).
    """
    t, d = flat(tau), diag.detach().reshape(-1).double().to(tau.device).clamp_min(0)
    if d.shape != t.shape:
        raise BaseMismatchError(f"diag has length {d.shape[0]}, tau has {t.shape[0]}")
    if not math.isfinite(c) or c < 0:
        raise TvdiagError(f"c must be a finite number >= 0, got {c}")
    mean = float(d.mean())
    if mean <= 0:
        return t.clone()
    return t / (1.0 + c * d / mean)
