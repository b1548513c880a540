"""Curvature-aware and multi-source repairs of an explainability vector (issue 10, "Methods").

Adding λ·τ to the target at θ_ftᵀ raises its classification loss by about ½ λ² τᵀ Hᵀ τ
(paper eq. 12; :mod:`diag.decide`). Each function here changes τ so that it keeps as much of
itself as possible while that quadratic cost falls. They are pure: flat float tensors (or
:class:`~train.vectors.TaskVector` for the mixes) in, the repaired vector out, nothing read
from disk and no target data touched. The curvature objects are the ones of
:mod:`diag.curvature`: an operator with ``op @ v``, a Hutchinson diagonal, the top-k
eigenpairs of a :class:`~diag.curvature.card.HessianCard` or an ``EigenResult``.

* :func:`project`: remove the top-k eigen-directions of Hᵀ (tier 1 with a card, tier 2);
* :func:`precondition`: shrink each coordinate by its curvature (tier 1, the card's diagonal);
* :func:`block_risk_matrix` + :func:`block_coefficients`: one λ per parameter block within a
  quadratic loss budget (tier 2: one HVP per block);
* :func:`mix`, :func:`universal`, :func:`weighted_by_gain`: several sources' τ*, never the target's.

Flat vectors follow a :class:`~diag.curvature.params.ParamLayout` (the operator's or the
card's); :func:`flat_of` and :func:`with_flat` move between a TaskVector and that order, leaving
the vector's tensors outside the layout untouched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from train.errors import BaseMismatchError, DataError, TvdiagError
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
    "parameter_blocks",
    "block_masks",
    "block_risk_matrix",
    "BlockSolution",
    "psd_projection",
    "block_coefficients",
    "apply_block_coefficients",
    "block_sizes",
    "mix",
    "universal",
    "weighted_by_gain",
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


def _flat(tau: Tensor) -> Tensor:
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
    t = _flat(tau)
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
    t = _flat(tau)
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
    t, d = _flat(tau), diag.detach().reshape(-1).double().to(tau.device).clamp_min(0)
    if d.shape != t.shape:
        raise BaseMismatchError(f"diag has length {d.shape[0]}, tau has {t.shape[0]}")
    if not math.isfinite(c) or c < 0:
        raise TvdiagError(f"c must be a finite number >= 0, got {c}")
    mean = float(d.mean())
    if mean <= 0:
        return t.clone()
    return t / (1.0 + c * d / mean)


# ------------------------------------------------------------------- per-block coefficients

_BLOCK = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.")
_EMBED = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
_HEAD = ("ln_post", "proj")


def _group_of(name: str) -> str:
    m = _BLOCK.search(name)
    if m:
        return f"block.{int(m.group(1))}"
    leaf = name.split("visual.")[-1].split(".")[0]
    if leaf in _EMBED:
        return "embeddings"
    if leaf in _HEAD:
        return "ln_post+proj"
    raise TvdiagError(f"Parameter '{name}' is not part of an open_clip ViT visual tower "
                      f"(expected {', '.join(_EMBED + _HEAD)} or transformer.resblocks.N.*)")


def parameter_blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Group a ViT's parameter names into embeddings, each transformer block and ln_post+proj.

    open_clip visual naming (any prefix such as ``visual.``): ``conv1``, ``class_embedding``,
    ``positional_embedding``, ``ln_pre`` → ``embeddings``; ``transformer.resblocks.N.*`` →
    ``block.N``; ``ln_post``, ``proj`` → ``ln_post+proj``. Groups come in network order and
    keep the given name order; empty groups are left out.

    Raises:
        TvdiagError: a name outside that naming.
    """
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_group_of(n), []).append(n)
    blocks = sorted((g for g in groups if g.startswith("block.")), key=lambda g: int(g.split(".")[1]))
    order = [g for g in ("embeddings", *blocks, "ln_post+proj") if g in groups]
    return {g: groups[g] for g in order}


def block_masks(layout, blocks: Mapping[str, Sequence[str]]) -> Tensor:
    """``(n_blocks, D)`` 0/1 float64 matrix: row i selects block i's entries of ``layout``'s flat vector.

    Raises:
        BaseMismatchError: a block names a parameter outside the layout, or blocks overlap.
    """
    offsets = layout.offsets()
    M = torch.zeros(len(blocks), layout.dim, dtype=torch.float64)
    for i, names in enumerate(blocks.values()):
        for n in names:
            if n not in offsets:
                raise BaseMismatchError(f"Block parameter '{n}' is not in the curvature layout")
            a, b = offsets[n]
            M[i, a:b] = 1.0
    if (M.sum(0) > 1).any():
        raise BaseMismatchError("Parameter blocks overlap")
    return M


def block_risk_matrix(op, tau: Tensor, masks: Tensor) -> Tensor:
    """Rblocks[i, j] = τᵢᵀ Hᵀ τⱼ with τᵢ = τ on block i and 0 elsewhere (float64, symmetrised).

    One HVP per block (the columns Hτᵢ, as one ``(D, n_blocks)`` product), then
    R = Tᵀ(HT) with T = [τ₁ … τₙ]; R is replaced by (R + Rᵀ)/2 to remove rounding asymmetry.
    With λ ∈ ℝⁿ the transferred vector Σᵢ λᵢτᵢ has risk λᵀRλ, and 1ᵀR1 = τᵀHτ when the blocks
    cover τ.

    Args:
        op: curvature operator (``op @ V`` on ``(D, n)`` blocks), e.g. a HessianOperator.
        tau: ``(D,)`` in the operator's flat order.
        masks: ``(n_blocks, D)`` from :func:`block_masks`.
    """
    t = _flat(tau)
    if masks.shape[1] != t.shape[0] or op.shape[0] != t.shape[0]:
        raise BaseMismatchError(f"tau has length {t.shape[0]}, masks {tuple(masks.shape)}, operator D={op.shape[0]}")
    T = (masks.double().to(t.device) * t[None, :]).T.contiguous()  # (D, n)
    HT = (op @ T.to(dtype=op.dtype, device=op.device)).double().to(t.device)
    R = T.T @ HT
    return (R + R.T) / 2


@dataclass
class BlockSolution:
    """Per-block coefficients of :func:`block_coefficients`.

    Attributes:
        lam: ``(n,)`` coefficients λᵢ ∈ [0, lam_max].
        size: Σᵢ λᵢ sᵢ, the objective.
        loss_increase: ½ λᵀRλ with the (PSD-projected) R used.
        budget: the budget b.
        interior: the closed form λ ∝ R⁻¹s was feasible (then ½λᵀRλ = b exactly).
        psd_projected: R had negative eigenvalues and was replaced by its PSD projection.
        method: ``"all-max"`` (λ = lam_max everywhere fits the budget), ``"closed-form"``,
            ``"slsqp"``.
    """

    lam: np.ndarray
    size: float
    loss_increase: float
    budget: float
    interior: bool
    psd_projected: bool
    method: str


def psd_projection(R: np.ndarray) -> tuple[np.ndarray, bool]:
    """Nearest PSD matrix in Frobenius norm (negative eigenvalues set to 0) and whether it changed R."""
    R = (np.asarray(R, dtype=np.float64) + np.asarray(R, dtype=np.float64).T) / 2
    w, Q = np.linalg.eigh(R)
    tol = 1e-12 * max(float(np.abs(w).max()), 1e-300)
    if w.min() >= -tol:
        return R, False
    return (Q * np.clip(w, 0, None)) @ Q.T, True


def block_coefficients(R, sizes, budget: float, lam_max: float) -> BlockSolution:
    """Per-block λ maximising the transferred size within a quadratic loss budget.

    maximise  Σᵢ λᵢ sᵢ   subject to  ½ λᵀ R λ ≤ b,  0 ≤ λᵢ ≤ lam_max,

    with sᵢ = ‖τᵢ‖². The size maximised is ⟨Σᵢ λᵢτᵢ, τ⟩ = Σᵢ λᵢ‖τᵢ‖², the inner product of the
    transferred vector with τ (‖τ‖ times the length of its component along τ), which is
    linear in λ; λ = c·1 gives c‖τ‖², the plain eq. 8 vector at λ2 = c.

    Solution: if λ = lam_max·1 fits the budget it is optimal (s ≥ 0). Otherwise, with R
    positive definite, the KKT point without active bounds is λ = μ R⁻¹s with
    μ = sqrt(2b / sᵀR⁻¹s) (budget met with equality); it is returned when it lies in the
    box. Else SLSQP (scipy) solves the convex problem from a feasible uniform start. A
    non-PSD R (a Hessian away from a minimum, or noise) is first projected onto the PSD cone
    (:func:`psd_projection`, flagged in the result), which keeps the problem convex.

    Raises:
        DataError: negative/non-finite budget or sizes, lam_max ≤ 0, shapes that differ.
    """
    R = np.asarray(R, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.float64).reshape(-1)
    n = s.shape[0]
    if R.shape != (n, n) or not np.isfinite(R).all():
        raise DataError(f"R must be a finite ({n}, {n}) matrix, got shape {R.shape}")
    if not math.isfinite(budget) or budget < 0:
        raise DataError(f"budget must be a finite number >= 0, got {budget}")
    if not math.isfinite(lam_max) or lam_max <= 0:
        raise DataError(f"lam_max must be a finite number > 0, got {lam_max}")
    if (s < 0).any() or not np.isfinite(s).all():
        raise DataError("block sizes must be finite and >= 0")
    R, projected = psd_projection(R)

    def done(lam: np.ndarray, interior: bool, method: str) -> BlockSolution:
        lam = np.clip(lam, 0.0, lam_max)
        return BlockSolution(lam, float(lam @ s), float(0.5 * lam @ R @ lam), float(budget), interior, projected,
                             method)

    full = np.full(n, float(lam_max))
    if 0.5 * full @ R @ full <= budget:
        return done(full, False, "all-max")
    w = np.linalg.eigvalsh(R)
    if w.min() > 1e-12 * w.max() and budget > 0:
        x = np.linalg.solve(R, s)
        q = float(s @ x)
        if q > 0:
            lam = math.sqrt(2 * budget / q) * x
            if lam.min() >= 0 and lam.max() <= lam_max:
                return done(lam, True, "closed-form")
    return done(_slsqp(R, s, budget, lam_max), False, "slsqp")


def _slsqp(R: np.ndarray, s: np.ndarray, budget: float, lam_max: float) -> np.ndarray:
    """SLSQP on max sᵀλ s.t. ½λᵀRλ ≤ b, 0 ≤ λ ≤ lam_max, from the largest feasible uniform λ."""
    from scipy.optimize import minimize

    n = s.shape[0]
    one = np.ones(n)
    q1 = float(one @ R @ one)
    start = one * (lam_max if q1 <= 0 else min(lam_max, math.sqrt(2 * budget / q1)))
    scale = max(float(s.max()), 1e-300)
    res = minimize(lambda x: -(s @ x) / scale, start, jac=lambda x: -s / scale, method="SLSQP",
                   bounds=[(0.0, lam_max)] * n,
                   constraints=[{"type": "ineq", "fun": lambda x: budget - 0.5 * x @ R @ x,
                                 "jac": lambda x: -(R @ x)}],
                   options={"ftol": 1e-12, "maxiter": 500})
    lam = np.clip(res.x, 0.0, lam_max)
    over = 0.5 * lam @ R @ lam
    if over > budget > 0:  # pull back onto the feasible set (SLSQP may overshoot by its tolerance)
        lam = lam * math.sqrt(budget / over)
    elif over > budget:
        lam = start
    return lam


def apply_block_coefficients(tau: Tensor, masks: Tensor, lam) -> Tensor:
    """Σᵢ λᵢ τᵢ: τ with each block scaled by its coefficient (entries outside every block scale by 0)."""
    t = _flat(tau)
    lam_t = torch.as_tensor(np.asarray(lam, dtype=np.float64)).to(t.device)
    return t * (masks.double().to(t.device).T @ lam_t)


def block_sizes(tau: Tensor, masks: Tensor) -> np.ndarray:
    """sᵢ = ‖τᵢ‖² per block."""
    t = _flat(tau)
    return (masks.double().to(t.device) @ t.pow(2)).cpu().numpy()


# ------------------------------------------------------------------------- multi-source


def mix(vectors: Mapping[str, TaskVector], weights: Mapping[str, float], target: str) -> TaskVector:
    """τ*mix = Σₛ wₛ τ*ˢ with the weights normalised to sum 1, never including the target.

    Args:
        vectors: source domain → τ*ˢ (same base and shapes).
        weights: source domain → weight ≥ 0 (keys must be a subset of ``vectors``; absent = 0).
        target: the target domain; passing its vector (by name) is refused.

    Raises:
        DataError: the target among the vectors or weights, negative/non-finite weights, all
            weights 0, or a weight for a domain without a vector.
    """
    if target in vectors or target in weights:
        raise DataError(f"mix refuses the target's own vector ('{target}'): only other domains may be mixed")
    missing = sorted(set(weights) - set(vectors))
    if missing:
        raise DataError(f"weights for domains without a vector: {', '.join(missing)}")
    w = {d: float(v) for d, v in weights.items()}
    if any(not math.isfinite(v) or v < 0 for v in w.values()):
        raise DataError(f"mixing weights must be finite and >= 0, got {w}")
    total = sum(w.values())
    if total <= 0:
        raise DataError("mixing weights are all 0")
    used = sorted(d for d, v in w.items() if v > 0)
    out = sum((w[d] / total) * vectors[d] for d in used)
    note = ", ".join(f"{d}:{w[d] / total:.3g}" for d in used)
    return TaskVector(dict(out.tensors), out.base_hash, {"derived": f"mix of {note}"})


def universal(vectors_by_domain: Mapping[str, TaskVector], target: str) -> TaskVector:
    """The universal explainability vector of ``target``: the uniform mix of every other domain's τ*."""
    others = {d: v for d, v in vectors_by_domain.items() if d != target}
    if not others:
        raise DataError(f"no domain other than '{target}' to mix")
    return mix(others, {d: 1.0 for d in others}, target)


def weighted_by_gain(vectors_by_domain: Mapping[str, TaskVector], predicted_gain: Mapping[str, float],
                     target: str) -> TaskVector:
    """Mix of the other domains' τ* with weights ∝ max(predicted gain, 0) (the ranker's prediction).

    Raises:
        DataError: no other domain has a positive predicted gain.
    """
    others = {d: v for d, v in vectors_by_domain.items() if d != target}
    w = {d: max(float(predicted_gain.get(d, 0.0)), 0.0) for d in others}
    if not any(v > 0 for v in w.values()):
        raise DataError(f"no source for '{target}' has a positive predicted gain: {dict(predicted_gain)}")
    return mix(others, w, target)
