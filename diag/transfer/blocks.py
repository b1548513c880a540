"""One λ per parameter block within a quadratic loss budget (the ``blocks`` transfer method).

The blocks of a ViT are its embedding, each residual block and its head (:func:`parameter_blocks`);
R_ij = τ_iᵀ Hᵀ τ_j over the block parts τ_i of τ (:func:`block_risk_matrix`, one HVP per block), and
:func:`block_coefficients` maximises the kept size Σ λ_i‖τ_i‖² subject to ½ λᵀRλ ≤ budget and
0 ≤ λ_i ≤ λ_max (tier 2: the target's Hessian operator is needed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diag.transfer.repair import flat
from train.errors import BaseMismatchError, DataError, TvdiagError

__all__ = ["parameter_blocks", "block_masks", "block_risk_matrix", "BlockSolution", "psd_projection",
           "block_coefficients", "apply_block_coefficients", "block_sizes"]



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
    t = flat(tau)
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
    t = flat(tau)
    lam_t = torch.as_tensor(np.asarray(lam, dtype=np.float64)).to(t.device)
    return t * (masks.double().to(t.device).T @ lam_t)


def block_sizes(tau: Tensor, masks: Tensor) -> np.ndarray:
    """sᵢ = ‖τᵢ‖² per block."""
    t = flat(tau)
    return (masks.double().to(t.device) @ t.pow(2)).cpu().numpy()


