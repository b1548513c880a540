"""Choosing a repair's hyper-parameter on the target's ``val`` split (tier 2).

Each repair of :mod:`diag.transfer.repair` has one knob: k eigen-directions removed (``project``), the
strength c (``precondition``), the loss budget of the per-block λ (``blocks``), the λ2 of a
mixture (``mix``: the universal vector; ``mix-ranked``: weighted by the ranker's predicted gain,
:func:`method_mixes`), or λ2 itself (``plain``, eq. 8). :func:`candidates` builds the repaired vectors of a
grid, each with its predicted loss increase ½λ²R (exact with an operator, else the card,
else the diagonal). :func:`select_repair` measures each candidate's top-1 accuracy on the
target's labelled ``val`` images (:data:`~diag.constants.CHOICE_SPLIT`; never ``test``, never
any φ of the target) and keeps the candidate that

1. keeps ≥ (1 − max_acc_drop) of θ_ftᵀ's val accuracy, as does every candidate of its grid with
   a smaller size (``safe``: a lucky measurement above an unsafe knob is not taken), and among those
2. transfers the largest size ⟨Δ, τ⟩/‖τ‖ (Δ the vector actually added, τ the unrepaired
   vector: the length of Δ's component along τ; plain eq. 8 at λ2 has size λ2‖τ‖).

When no candidate keeps the accuracy, the one with the best val accuracy is returned with
``safe = False``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from diag.constants import CHECK_IMAGES, CHOICE_SPLIT, DEFAULT_MAX_ACC_DROP, LAMBDA_GRID, PAPER_LAMBDA1, PAPER_LAMBDA2
from diag.curvature.params import ParamLayout
from diag.curvature.risk import risk_diagonal
from diag.runtime.context import Workspace
from diag.transfer import blocks, mixing, repair
from diag.transfer.budget import BUDGET_TOL, safe_sizes
from diag.transfer.eq8 import accuracy_and_loss, transferred_state
from train.errors import DataError, TvdiagError, unknown
from train.vectors import TaskVector

METHODS = ("plain", "project", "precondition", "blocks", "mix", "mix-ranked")
#: Multi-source methods: ``mix`` the uniform (universal) mix, ``mix-ranked`` weighted by the ranker's predicted gain.
MIX_METHODS = ("mix", "mix-ranked")
#: Budgets of ``blocks`` as fractions of plain eq. 8's predicted loss increase ½λ2²R(τ).
BUDGET_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)

__all__ = [
    "METHODS",
    "MIX_METHODS",
    "BUDGET_FRACTIONS",
    "RepairCurvature",
    "Candidate",
    "candidates",
    "RepairChoice",
    "select_repair",
    "mixtures",
    "method_mixes",
]



# ------------------------------------------------------------------------------ curvature


@dataclass
class RepairCurvature:
    """The target curvature a repair may use (what the tier at hand provides).

    Attributes:
        layout: flat order of the parameters the curvature covers (τ outside it is kept as is).
        diag: ``(D,)`` diag(Hᵀ) (tier 1), or None.
        card: HessianCard with the top-k eigenpairs (tier 1), or None.
        operator: curvature operator of Hᵀ on target train images (tier 2), or None.
    """

    layout: object
    diag: torch.Tensor | None = None
    card: object | None = None
    operator: object | None = None

    @classmethod
    def of(cls, curvature) -> "RepairCurvature":
        """From a :class:`~diag.features.pair_features.TargetCurvature`, a HessianCard or an operator (``op.layout``)."""
        if isinstance(curvature, RepairCurvature):
            return curvature
        if hasattr(curvature, "card") and hasattr(curvature, "diag"):  # TargetCurvature
            return cls(curvature.card.layout, curvature.diag, curvature.card, getattr(curvature, "operator", None))
        if hasattr(curvature, "eigvecs") and hasattr(curvature, "residual_diag"):  # HessianCard
            return cls(curvature.layout, repair.card_diagonal(curvature), curvature)
        if hasattr(curvature, "layout") and hasattr(curvature, "shape"):  # model operator
            return cls(curvature.layout, operator=curvature)
        raise TvdiagError(f"Not a curvature object: {type(curvature).__name__} (expected a TargetCurvature, "
                          "a HessianCard or a curvature operator)")

    def risk(self, flat: torch.Tensor) -> tuple[float, str]:
        """(R = τᵀHτ, how): exact with the operator, else the card's, else Σ diag τ²."""
        if self.operator is not None:
            return self.operator.quadratic_form(flat.to(self.operator.dtype)), "exact"
        if self.card is not None:
            return self.card.risk(flat), "card"
        if self.diag is not None:
            return risk_diagonal(self.diag, flat), "diag"
        raise TvdiagError("The curvature object holds no operator, card or diagonal")

    def need(self, what: str, method: str):
        """The ``diag``, ``card`` or ``operator`` a method needs, or an error naming the method."""
        value = getattr(self, what)
        if value is None:
            raise TvdiagError(f"--method {method} needs the target's {what} (not in the curvature given)")
        return value


# ------------------------------------------------------------------------------ candidates


@dataclass
class Candidate:
    """One repaired vector of a grid: Δ = ``scale``·``vector`` is added to θ_ftᵀ (with λ1·τ_ftᵀ).

    Attributes:
        method: one of :data:`METHODS`.
        param: the knob (k, c, budget, mixture name, or λ2 for ``plain``).
        vector: the repaired vector.
        scale: λ2 applied to it (1.0 for ``blocks``, whose λᵢ are inside the vector).
        predicted_loss_increase: ½ scale² R(vector) (``blocks``: ½λᵀRblocksλ, the same number).
        risk_source: ``exact``, ``card`` or ``diag``.
        size: ⟨Δ, τ⟩/‖τ‖ with τ the unrepaired vector.
    """

    method: str
    param: float | int | str
    vector: TaskVector
    scale: float
    predicted_loss_increase: float
    risk_source: str
    size: float


def _candidate(method, param, vec: TaskVector, scale: float, tau: TaskVector, curv: RepairCurvature) -> Candidate:
    flat = repair.flat_of(vec, curv.layout)
    r, how = curv.risk(flat)
    norm = tau.norm()
    size = scale * vec.dot(tau) / norm if norm > 0 else 0.0
    return Candidate(method, param, vec, float(scale), 0.5 * scale * scale * r, how, size)


def _project_ks(card, flat: torch.Tensor, shares: Sequence[float]) -> list[int]:
    ks = {repair.choose_k_by_share(card.eigvals, card, flat, s) for s in shares} | {card.k}
    return sorted(k for k in ks if k > 0)


def candidates(method: str, tau: TaskVector, curvature, lambda2: float = PAPER_LAMBDA2,
               grid: Sequence | None = None, mixes: Mapping[str, TaskVector] | None = None,
               lam_max: float = max(LAMBDA_GRID)) -> list[Candidate]:
    """The repaired vectors of ``method`` over its grid, with predicted ½λ²R and size.

    Grids (``grid`` overrides): ``plain``: λ2 ∈ :data:`~diag.constants.LAMBDA_GRID`;
    ``project``: the k reaching each share of :data:`~diag.transfer.repair.SHARE_GRID` of the positive
    risk, plus all of the card's k; ``precondition``: c ∈ :data:`~diag.transfer.repair.PRECONDITION_GRID`;
    ``blocks``: budgets f·½λ2²R(τ) for f ∈ :data:`BUDGET_FRACTIONS` (``grid`` then gives the
    fractions), λᵢ ∈ [0, ``lam_max``]; ``mix``: each of ``mixes`` (name → vector, built with
    :func:`diag.transfer.mixing.mix`) at λ2 ∈ LAMBDA_GRID (``grid`` gives the λ2 values).
    ``project``/``precondition`` apply the repaired vector at ``lambda2``.
    """
    curv = RepairCurvature.of(curvature)
    flat = repair.flat_of(tau, curv.layout)
    if method == "plain":
        return [_candidate(method, float(lam), tau, lam, tau, curv) for lam in (grid or LAMBDA_GRID)]
    if method == "project":
        card = curv.need("card", method)
        ks = list(grid) if grid is not None else _project_ks(card, flat, repair.SHARE_GRID)
        return [_candidate(method, int(k), repair.with_flat(tau, repair.project(flat, card, int(k)), curv.layout,
                                                            f"projected off top-{k}"), lambda2, tau, curv)
                for k in ks]
    if method == "precondition":
        d = curv.need("diag", method)
        return [_candidate(method, float(c), repair.with_flat(tau, repair.precondition(flat, d, c), curv.layout,
                                                              f"preconditioned c={c}"), lambda2, tau, curv)
                for c in (grid or repair.PRECONDITION_GRID)]
    if method == "blocks":
        return _block_candidates(tau, flat, curv, lambda2, grid or BUDGET_FRACTIONS, lam_max)
    if method in MIX_METHODS:
        if not mixes:
            raise TvdiagError(f"--method {method} needs at least one mixture (e.g. diag.transfer.mixing.universal)")
        return [_candidate(method, name, vec, lam, vec, curv) for name, vec in mixes.items()
                for lam in (grid or LAMBDA_GRID)]
    raise unknown("repair method", method, METHODS)


def _block_candidates(tau: TaskVector, flat: torch.Tensor, curv: RepairCurvature, lambda2: float,
                      fractions: Sequence[float], lam_max: float) -> list[Candidate]:
    """Per-block λ for each budget f·½λ2²R(τ) (one HVP per block, shared by every budget)."""
    op = curv.need("operator", "blocks")
    masks = blocks.block_masks(curv.layout, blocks.parameter_blocks(curv.layout.names))
    R = blocks.block_risk_matrix(op, flat, masks).cpu().numpy()
    sizes = blocks.block_sizes(flat, masks)
    plain = 0.5 * lambda2 ** 2 * float(R.sum())
    out = []
    for f in fractions:
        sol = blocks.block_coefficients(R, sizes, max(float(f) * plain, 0.0), lam_max)
        vec = repair.with_flat(tau, blocks.apply_block_coefficients(flat, masks, sol.lam), curv.layout,
                               f"per-block λ, budget {f:g}×plain")
        norm = tau.norm()
        out.append(Candidate("blocks", float(f), vec, 1.0, sol.loss_increase, "exact",
                             vec.dot(tau) / norm if norm > 0 else 0.0))
    return out


# ------------------------------------------------------------------------------- choosing


@dataclass
class RepairChoice:
    """The repair chosen on the target's ``val`` split.

    Attributes:
        target: the target domain.
        candidate: the chosen :class:`Candidate` (add ``candidate.scale``·``candidate.vector``
            with :func:`diag.transfer.evaluate.transferred_state`).
        val_accuracy: its top-1 accuracy on the ``val`` images.
        val_accuracy_ft_target: θ_ftᵀ's accuracy on the same images.
        measured_loss_increase: its val cross-entropy minus θ_ftᵀ's (what ½λ²R predicts).
        safe: it keeps ≥ (1 − max_acc_drop) of θ_ftᵀ's val accuracy, and so does every
            candidate of its grid (its mixture, for ``mix``) with a smaller size.
        table: every candidate (method, param, scale, predicted_loss_increase, risk_source,
            measured_loss_increase, size, val_accuracy, acc_kept, keeps, safe).
    """

    target: str
    candidate: Candidate
    val_accuracy: float
    val_accuracy_ft_target: float
    measured_loss_increase: float
    safe: bool
    max_acc_drop: float
    table: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)

    def summary(self) -> dict:
        """JSON-able numbers of the choice (``predicted_loss_increase`` None without a curvature, never NaN),
        and ``vector``: how the chosen vector was made (a mix's weights, e.g. ``mix of a:0.6, b:0.4``)."""
        c = self.candidate
        predicted = float(c.predicted_loss_increase)
        return {"param": c.param if isinstance(c.param, (int, float)) else str(c.param), "scale": float(c.scale),
                "predicted_loss_increase": predicted if math.isfinite(predicted) else None,
                "measured_loss_increase": float(self.measured_loss_increase),
                "risk_source": c.risk_source, "size": float(c.size), "val_accuracy": float(self.val_accuracy),
                "val_accuracy_ft_target": float(self.val_accuracy_ft_target), "safe": bool(self.safe),
                "vector": str(c.vector.provenance.get("derived", ""))}


def select_repair(ws: Workspace, target: str, tau: TaskVector, method: str, curvature=None,
                  lambda1: float = PAPER_LAMBDA1, lambda2: float = PAPER_LAMBDA2, grid: Sequence | None = None,
                  mixes: Mapping[str, TaskVector] | None = None, max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
                  n_images: int | None = CHECK_IMAGES) -> RepairChoice:
    """Choose ``method``'s hyper-parameter by accuracy on ``target``'s ``val`` images.

    Args:
        ws: workspace of the store (θ_base, τ_ftᵀ, the target's head and val images).
        target: target domain.
        tau: the source's τ*ˢ (ignored by ``mix`` / ``mix-ranked``, whose vectors come in ``mixes``).
        method: one of :data:`METHODS`.
        curvature: the target's curvature (TargetCurvature, HessianCard or operator); for
            ``plain`` and ``mix`` it only predicts ½λ²R and may be None.
        lambda1, lambda2: eq. 8's scales (λ2 is the fixed scale of ``project``/``precondition``).
        grid, mixes: see :func:`candidates`.
        max_acc_drop: accuracy budget relative to θ_ftᵀ's val accuracy.
        n_images: val images read (None: all).

    Raises:
        DataError: a curvature object built for another target, or an empty val split.
    """
    if not 0 <= max_acc_drop < 1:
        raise DataError(f"max_acc_drop must lie in [0, 1), got {max_acc_drop}")
    curv = _curvature_for(target, curvature, tau)
    cands = candidates(method, tau, curv, lambda2, grid, mixes)
    images = ws.target_set(target, CHOICE_SPLIT, n_images)
    if images.split != CHOICE_SPLIT or images.phi is not None or len(images.y) == 0:
        raise DataError(f"repair choices read only labelled '{CHOICE_SPLIT}' images of '{target}'")
    ft_t = ws.vector(target, "ft")
    base_acc, base_loss = accuracy_and_loss(ws, target, ws.state(ft_t), images)
    rows = []
    for c in cands:
        acc, loss = accuracy_and_loss(ws, target, transferred_state(ws, ft_t, c.vector, lambda1, c.scale), images)
        kept = acc / base_acc if base_acc > 0 else math.nan
        rows.append({"method": c.method, "param": c.param, "scale": c.scale,
                     "predicted_loss_increase": c.predicted_loss_increase, "risk_source": c.risk_source,
                     "measured_loss_increase": loss - base_loss, "size": c.size, "val_accuracy": acc,
                     "acc_kept": kept, "acc_drop": 1.0 - kept,
                     "keeps": bool(1.0 - kept <= max_acc_drop + BUDGET_TOL)})
    table = _mark_safe(pd.DataFrame(rows), by_param=method in MIX_METHODS, budget=max_acc_drop)
    best = _best(table)
    return RepairChoice(target, cands[best], float(table.at[best, "val_accuracy"]), base_acc,
                        float(table.at[best, "measured_loss_increase"]), bool(table.at[best, "safe"]), max_acc_drop,
                        table)


def _mark_safe(table: pd.DataFrame, by_param: bool, budget: float) -> pd.DataFrame:
    """Column ``safe``: :func:`diag.transfer.budget.safe_sizes` within each family of candidates.

    A family is the whole grid, or one mixture (``by_param``) whose λ2 varies: a row is safe when
    it and every row of its family with a smaller size keep the budget (the one rule of every
    size choice; val accuracy is not monotone in the size on a few hundred images).
    """
    table = table.copy()
    table["safe"] = False
    families = table.groupby(table["param"].astype(str) if by_param else pd.Series(0, index=table.index))
    for _, fam in families:
        table.loc[fam.index, "safe"] = safe_sizes(fam["size"].to_numpy(), fam["acc_drop"].to_numpy(), budget)
    return table


def _best(table: pd.DataFrame) -> int:
    """Row of the largest size among the ``safe`` rows (ties: smaller predicted loss); else of
    the best val accuracy (ties: larger size)."""
    keep = table[table["safe"]]
    if len(keep):
        return int(keep.sort_values(["size", "predicted_loss_increase"], ascending=[False, True],
                                    kind="stable").index[0])
    return int(table.sort_values(["val_accuracy", "size"], ascending=[False, False], kind="stable").index[0])


def _curvature_for(target: str, curvature, tau: TaskVector) -> RepairCurvature:
    """The curvature as :class:`RepairCurvature`; a card made for another target is refused.

    Without a curvature (``plain``/``mix`` only), a diagonal of zeros over τ's own layout
    stands in: the predicted loss increase is then NaN (unknown), with ``risk_source = 'none'``.
    """
    if curvature is None:

        names = tuple(tau.tensors)
        layout = ParamLayout(names, tuple(tuple(tau.tensors[n].shape) for n in names))
        return _NoCurvature(layout, torch.zeros(layout.dim, dtype=torch.float64))
    curv = RepairCurvature.of(curvature)
    made_for = getattr(curv.card, "provenance", {}).get("target") if curv.card is not None else None
    if made_for is not None and made_for != target:
        raise DataError(f"the curvature given was built for '{made_for}', not for the target '{target}'")
    return curv


class _NoCurvature(RepairCurvature):
    def risk(self, flat: torch.Tensor) -> tuple[float, str]:
        return math.nan, "none"


def mixtures(ws: Workspace, target: str, sources: Sequence[str],
             predicted_gain: Mapping[str, float] | None = None) -> dict[str, TaskVector]:
    """``{"universal": uniform mix of the sources' τ*, "gain": mix ∝ max(predicted gain, 0)}``.

    The target is dropped from ``sources`` (its τ* needs its explanations); ``gain`` is left
    out without a prediction or when no source has a positive predicted gain.
    """
    vectors = {s: ws.vector(s, "star") for s in sources if s != target}
    out = {"universal": mixing.universal(vectors, target)}
    if predicted_gain and any(float(predicted_gain.get(s, 0.0)) > 0 for s in vectors):
        out["gain"] = mixing.weighted_by_gain(vectors, predicted_gain, target)
    return out


def method_mixes(method: str, ws: Workspace, target: str, sources: Sequence[str],
                 predicted_gain: Mapping[str, float] | None = None) -> dict[str, TaskVector]:
    """The mixtures of a multi-source method: ``mix`` → ``{"universal"}``; ``mix-ranked`` → ``{"ranked"}``.

    ``ranked`` is Σ wₛ τ*ˢ with wₛ = :func:`diag.transfer.mixing.mix_weights` of ``predicted_gain``
    (the ranker's gains for ``target``, fitted without the target's pairs). When no source has a
    positive predicted gain the ranker says "transfer nothing": ``ranked`` is then the zero vector
    (the transferred model is θ_ftᵀ itself, whatever λ2).

    Raises:
        DataError: ``mix-ranked`` without gains.
    """
    if method == "mix":
        return {"universal": mixtures(ws, target, sources)["universal"]}
    if method != "mix-ranked":
        raise unknown("multi-source method", method, MIX_METHODS)
    if predicted_gain is None:
        raise DataError(f"mix-ranked needs the ranker's predicted gains for '{target}'")
    vectors = {s: ws.vector(s, "star") for s in sources if s != target}
    w = mixing.mix_weights({s: predicted_gain.get(s, 0.0) for s in vectors}, target)
    if not w:
        zero = 0.0 * next(iter(vectors.values()))
        return {"ranked": TaskVector(dict(zero.tensors), zero.base_hash, {"derived": "no positive predicted gain"})}
    return {"ranked": mixing.mix(vectors, w, target)}
