"""The transfer methods: one registry, the curvature each may use, and the candidates each builds.

:data:`REGISTRY` is the one list of methods: every command's ``--method(s)`` choices, the study's
methods, the tiers a recommendation may use and the candidate builder of each come from it.

===============  =================  =====  =======  ====================================================
method           curvature          mix    tiers    candidates (the knob chosen on ``val``)
===============  =================  =====  =======  ====================================================
``plain``        none               no     0, 1, 2  eq. 8 at λ2 of the grid
``project``      card (top-k)       no     1, 2     τ with its top-k eigen-directions of Hᵀ removed
``precondition`` diagonal           no     1, 2     τ shrunk coordinatewise by the curvature, strength c
``blocks``       operator (HVPs)    no     2        one λ per parameter block within a loss budget
``mix``          none               yes    —        the uniform mix of the other domains' τ*, at λ2
``mix-ranked``   none               yes    —        the ranker-weighted mix, at λ2
``mix-matched``  none               yes    —        the uniform mix at plain eq. 8's ‖λ2·τ*ˢ‖ (no knob)
``mix-ranked-``  none               yes    —        the ranker-weighted mix at plain eq. 8's ‖λ2·τ*ˢ‖
``matched``                                         (no knob)
===============  =================  =====  =======  ====================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from diag.constants import LAMBDA_GRID, PAPER_LAMBDA2
from diag.curvature.params import ParamLayout
from diag.curvature.risk import risk_diagonal
from diag.transfer import blocks, repair
from train.errors import DataError, TvdiagError, unknown
from train.vectors import TaskVector

#: Budgets of ``blocks`` as fractions of plain eq. 8's predicted loss increase ½λ2²R(τ).
BUDGET_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)


@dataclass
class RepairCurvature:
    """The target curvature a repair may use (what the tier at hand provides).

    Attributes:
        layout: flat order of the parameters the curvature covers (τ outside it is kept as is).
        diag: ``(D,)`` diag(Hᵀ) (tier 1), or None.
        card: a card of either form (its risk; tier 1), or None.
        operator: curvature operator of Hᵀ on target train images (tier 2), or None.
        eig: the HessianCard with the top-k eigenpairs (``project``), or None.
    """

    layout: object
    diag: torch.Tensor | None = None
    card: object | None = None
    operator: object | None = None
    eig: object | None = None

    def __post_init__(self) -> None:
        if self.eig is None and hasattr(self.card, "eigvecs"):  # an eigenpair card given as the card is its eig too
            self.eig = self.card

    @classmethod
    def of(cls, curvature) -> "RepairCurvature":
        """From a :class:`~diag.features.pair_features.TargetCurvature`, a card of either form (a HessianCard,
        a KfacCard) or an operator (``op.layout``)."""
        if isinstance(curvature, RepairCurvature):
            return curvature
        if hasattr(curvature, "card") and hasattr(curvature, "diag"):  # TargetCurvature
            return cls(curvature.card.layout, curvature.diag, curvature.card, getattr(curvature, "operator", None),
                       getattr(curvature, "eig", None))
        if hasattr(curvature, "eigvecs") and hasattr(curvature, "residual_diag"):  # HessianCard
            return cls(curvature.layout, repair.card_diagonal(curvature), curvature, eig=curvature)
        if getattr(curvature, "form", None) == "kfac":  # KfacCard: its own diagonal, no eigenpairs
            return cls(curvature.layout, curvature.diagonal(), curvature)
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
        """The ``diag``, ``card``, ``eig`` or ``operator`` a method needs, or an error naming the method."""
        value = getattr(self, what)
        if value is None:
            what = "eigenpair card (--card-form eig)" if what == "eig" else what
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


def _candidate(method, param, vec: TaskVector, scale: float, tau: TaskVector, curv: RepairCurvature,
               risk: tuple[float, str] | None = None) -> Candidate:
    """One candidate; ``risk`` is ``curv.risk`` of ``vec`` when already known (the same vector at another scale)."""
    r, how = risk if risk is not None else curv.risk(repair.flat_of(vec, curv.layout))
    norm = tau.norm()
    size = scale * vec.dot(tau) / norm if norm > 0 else 0.0
    return Candidate(method, param, vec, float(scale), 0.5 * scale * scale * r, how, size)


def _scaled(method, vec: TaskVector, params_scales, tau: TaskVector, curv: RepairCurvature,
            flat: torch.Tensor | None = None) -> list[Candidate]:
    """``vec`` at each ``(param, scale)``: its risk (an exact product with the operator) computed once
    (``flat``: ``vec`` already flattened in ``curv``'s layout)."""
    risk = curv.risk(repair.flat_of(vec, curv.layout) if flat is None else flat)
    return [_candidate(method, param, vec, scale, tau, curv, risk) for param, scale in params_scales]


def _project_ks(card, flat: torch.Tensor, shares: Sequence[float]) -> list[int]:
    ks = {repair.choose_k_by_share(card.eigvals, card, flat, s) for s in shares} | {card.k}
    return sorted(k for k in ks if k > 0)


def candidates(method: str, tau: TaskVector, curvature, lambda2: float = PAPER_LAMBDA2,
               grid: Sequence | None = None, mixes: Mapping[str, TaskVector] | None = None,
               lam_max: float = max(LAMBDA_GRID)) -> list[Candidate]:
    """The repaired vectors of ``method`` over its grid, with predicted ½λ²R and size (its :data:`REGISTRY` builder).

    Grids (``grid`` overrides): ``plain``: λ2 ∈ :data:`~diag.constants.LAMBDA_GRID`;
    ``project``: the k reaching each share of :data:`~diag.transfer.repair.SHARE_GRID` of the positive
    risk, plus all of the card's k; ``precondition``: c ∈ :data:`~diag.transfer.repair.PRECONDITION_GRID`;
    ``blocks``: budgets f·½λ2²R(τ) for f ∈ :data:`BUDGET_FRACTIONS` (``grid`` then gives the
    fractions), λᵢ ∈ [0, ``lam_max``]; ``mix``: each of ``mixes`` (name → vector, built with
    :func:`diag.transfer.mixing.mix`) at λ2 ∈ LAMBDA_GRID (``grid`` gives the λ2 values);
    ``mix-matched``: each of ``mixes`` at the scale of :func:`matched_scale` (``grid`` gives the λ2 values
    whose ‖λ2·τ‖ it matches; default ``lambda2`` alone).
    ``project``/``precondition`` apply the repaired vector at ``lambda2``.

    Raises:
        UnknownNameError: a method not in :data:`REGISTRY`.
    """
    if method not in REGISTRY:
        raise unknown("repair method", method, METHODS)
    curv = RepairCurvature.of(curvature)
    flat = repair.flat_of(tau, curv.layout)
    return REGISTRY[method].build(method, tau, flat, curv, lambda2, grid, mixes, lam_max)


def _plain(method, tau, flat, curv, lambda2, grid, mixes, lam_max) -> list[Candidate]:
    return _scaled(method, tau, [(float(lam), lam) for lam in (grid or LAMBDA_GRID)], tau, curv, flat)


def _project(method, tau, flat, curv, lambda2, grid, mixes, lam_max) -> list[Candidate]:
    card = curv.need("eig", method)
    ks = list(grid) if grid is not None else _project_ks(card, flat, repair.SHARE_GRID)
    return [_candidate(method, int(k), repair.with_flat(tau, repair.project(flat, card, int(k)), curv.layout,
                                                        f"projected off top-{k}"), lambda2, tau, curv)
            for k in ks]


def _precondition(method, tau, flat, curv, lambda2, grid, mixes, lam_max) -> list[Candidate]:
    d = curv.need("diag", method)
    return [_candidate(method, float(c), repair.with_flat(tau, repair.precondition(flat, d, c), curv.layout,
                                                          f"preconditioned c={c}"), lambda2, tau, curv)
            for c in (grid or repair.PRECONDITION_GRID)]


def _mix(method, tau, flat, curv, lambda2, grid, mixes, lam_max) -> list[Candidate]:
    if not mixes:
        raise TvdiagError(f"--method {method} needs at least one mixture (e.g. diag.transfer.mixing.universal)")
    return [c for name, vec in mixes.items() for c in _scaled(method, vec, [(name, lam) for lam in (grid or LAMBDA_GRID)],
                                                             vec, curv)]


def matched_scale(mix: TaskVector, tau: TaskVector, lambda2: float) -> float:
    """λ with ‖λ·mix‖ = ‖λ2·τ‖: the scale putting a mix at the step ‖Δθ‖ plain eq. 8 takes with τ at λ2.

    λ = λ2·‖τ‖ / ‖mix‖. The uniform mix of n near-orthogonal τ* of similar norms has about 1/√n of
    one τ*'s norm, so at the same λ2 it moves θ_ftᵀ √n times less than eq. 8 with one source: a
    mix compared with a single source at λ2 is then also a smaller step. ``mix-matched`` compares
    the same mix at the same step as the single source τ of its row (the pair's τ*ˢ); a study's
    per-target count reads the row of the ranker's source (:mod:`diag.study.methods_report`), so
    there the mix is matched to the ranker-picked τ*ˢ — the one vector it is compared with —,
    not to the mean norm of the target's sources (a step that neither contender takes).

    >>> a = TaskVector({"w": torch.tensor([3.0, 0.0])}, "b")
    >>> m = TaskVector({"w": torch.tensor([0.0, 1.0])}, "b")
    >>> matched_scale(m, a, 0.5)  # ‖1.5·m‖ = ‖0.5·a‖ = 1.5
    1.5

    Raises:
        DataError: a mix of norm 0 (no step of that length exists along it).
    """
    norm = mix.norm()
    if not norm > 0:
        raise DataError("a mix of norm 0 cannot be matched to a single source's step")
    return float(lambda2) * tau.norm() / norm


def _mix_matched(method, tau, flat, curv, lambda2, grid, mixes, lam_max) -> list[Candidate]:
    """Each mix at the step of τ at λ2 (a zero mix — the ranker's "transfer nothing" — at scale 0: θ_ftᵀ itself)."""
    if not mixes:
        raise TvdiagError(f"--method {method} needs at least one mixture (e.g. diag.transfer.mixing.universal)")
    return [c for name, vec in mixes.items()
            for c in _scaled(method, vec, [(name, matched_scale(vec, tau, lam) if vec.norm() > 0 else 0.0)
                                           for lam in (grid or (lambda2,))], vec, curv)]


def _blocks(method, tau: TaskVector, flat: torch.Tensor, curv: RepairCurvature, lambda2: float,
            grid: Sequence[float] | None, mixes, lam_max: float) -> list[Candidate]:
    """Per-block λ for each budget f·½λ2²R(τ) (one HVP per block, shared by every budget)."""
    op = curv.need("operator", "blocks")
    masks = blocks.block_masks(curv.layout, blocks.parameter_blocks(curv.layout.names))
    R = blocks.block_risk_matrix(op, flat, masks).cpu().numpy()
    sizes = blocks.block_sizes(flat, masks)
    plain = 0.5 * lambda2 ** 2 * float(R.sum())
    out = []
    for f in grid or BUDGET_FRACTIONS:
        sol = blocks.block_coefficients(R, sizes, max(float(f) * plain, 0.0), lam_max)
        vec = repair.with_flat(tau, blocks.apply_block_coefficients(flat, masks, sol.lam), curv.layout,
                               f"per-block λ, budget {f:g}×plain")
        norm = tau.norm()
        out.append(Candidate("blocks", float(f), vec, 1.0, sol.loss_increase, "exact",
                             vec.dot(tau) / norm if norm > 0 else 0.0))
    return out



def curvature_for(target: str, curvature, tau: TaskVector) -> RepairCurvature:
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


# ------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    """One transfer method: what it needs and how it builds its candidates.

    Attributes:
        name: the method's name in commands, tables and JSON.
        curvature: what of Hᵀ it uses: ``None``, ``"diag"``/``"eig"`` (tier 1: a published card; ``eig`` its
            eigenpairs, the eig form's), ``"operator"``.
        mix: a multi-source method (several sources' τ*, never the target's).
        tiers: the data-access tiers whose recommendation may use it (mixes are listed apart).
        build: ``build(method, tau, flat, curvature, lambda2, grid, mixes, lam_max) -> [Candidate]``.
    """

    name: str
    curvature: str | None
    mix: bool
    tiers: tuple[int, ...]
    build: Callable[..., list[Candidate]]


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("plain", None, False, (0, 1, 2), _plain),
    Method("project", "eig", False, (1, 2), _project),
    Method("precondition", "diag", False, (1, 2), _precondition),
    Method("blocks", "operator", False, (2,), _blocks),
    Method("mix", None, True, (), _mix),
    Method("mix-ranked", None, True, (), _mix),
    Method("mix-matched", None, True, (), _mix_matched),
    Method("mix-ranked-matched", None, True, (), _mix_matched),
)}
#: Every method, in the registry's order.
METHODS: tuple[str, ...] = tuple(REGISTRY)
#: Multi-source methods: ``mix`` the uniform (universal) mix, ``mix-ranked`` weighted by the ranker's predicted gain,
#: ``mix-matched`` the uniform mix at the step ‖λ2·τ*ˢ‖ of its row's single source (:func:`matched_scale`).
MIX_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY.values() if m.mix)
#: Mixes weighted by the ranker's predicted gains (they need the study's known pairs, fitted without the target).
RANKED_METHODS: tuple[str, ...] = ("mix-ranked", "mix-ranked-matched")
#: Mixes put at their row's single source's step (their rows differ by source, :func:`matched_scale`).
MATCHED_METHODS: tuple[str, ...] = ("mix-matched", "mix-ranked-matched")
#: Methods that read the target's curvature.
CURVED_METHODS: tuple[str, ...] = tuple(m.name for m in REGISTRY.values() if m.curvature is not None)
#: The data-access tiers some method belongs to (0: weights only, 1: a card, 2: labelled target images).
TIERS: tuple[int, ...] = tuple(sorted({t for m in REGISTRY.values() for t in m.tiers}))


def tier_methods_of(tier: int) -> tuple[str, ...]:
    """The single-source methods a recommendation of ``tier`` may use, in registry order."""
    return tuple(m.name for m in REGISTRY.values() if tier in m.tiers)
