"""Choosing a repair's hyper-parameter on the target's ``val`` split (tier 2).

Each repair of :mod:`diag.transfer.repair` has one knob: k eigen-directions removed (``project``), the
strength c (``precondition``), the loss budget of the per-block λ (``blocks``), the λ2 of a
mixture (``mix``: the universal vector; ``mix-ranked``: weighted by the ranker's predicted gain,
:func:`method_mixes`; ``mix-matched`` has none: the universal vector at plain eq. 8's step), or λ2 itself (``plain``, eq. 8). :func:`diag.transfer.methods.candidates` builds the repaired vectors of a
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

from diag.constants import CHECK_IMAGES, CHOICE_SPLIT, DEFAULT_MAX_ACC_DROP, PAPER_LAMBDA1, PAPER_LAMBDA2
from diag.runtime.context import Workspace
from diag.transfer import mixing
from diag.transfer.budget import BUDGET_TOL, safe_sizes
from diag.stats.paired import paired_change, paired_drop
from diag.transfer.eq8 import correct_and_loss, transferred_state
from diag.transfer.methods import MIX_METHODS, RANKED_METHODS, Candidate, candidates, curvature_for
from train.errors import DataError, unknown
from train.vectors import TaskVector

__all__ = ["RepairChoice", "method_mixes", "select_repair"]


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
        measured_loss_increase: its val cross-entropy minus θ_ftᵀ's (what the loss model predicts);
            measured_loss_increase_se its paired standard error (:func:`diag.stats.paired.paired_change`).
        safe: it keeps ≥ (1 − max_acc_drop) of θ_ftᵀ's val accuracy, and so does every
            candidate of its grid (its mixture, for ``mix``) with a smaller size.
        table: every candidate (method, param, scale, predicted_loss_increase, risk_source,
            measured_loss_increase, measured_loss_increase_se, size, val_accuracy, acc_kept, acc_drop, acc_drop_se, n_val, keeps, safe).
        val_acc_drop_se: the paired standard error of its val accuracy drop 1 − val_accuracy ÷
            val_accuracy_ft_target (:func:`diag.stats.paired.paired_drop`, same images).
        n_val: the val images.
    """

    target: str
    candidate: Candidate
    val_accuracy: float
    val_accuracy_ft_target: float
    measured_loss_increase: float
    safe: bool
    max_acc_drop: float
    table: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)
    val_acc_drop_se: float = math.nan
    n_val: int = 0
    measured_loss_increase_se: float = math.nan

    def summary(self) -> dict:
        """JSON-able numbers of the choice (``predicted_loss_increase`` None without a curvature, never NaN),
        and ``vector``: how the chosen vector was made (a mix's weights, e.g. ``mix of a:0.6, b:0.4``)."""
        c = self.candidate
        predicted = float(c.predicted_loss_increase)
        return {"param": c.param if isinstance(c.param, (int, float)) else str(c.param), "scale": float(c.scale),
                "predicted_loss_increase": predicted if math.isfinite(predicted) else None,
                "measured_loss_increase": float(self.measured_loss_increase),
                "measured_loss_increase_se": float(self.measured_loss_increase_se)
                if math.isfinite(self.measured_loss_increase_se) else None,
                "risk_source": c.risk_source, "size": float(c.size), "val_accuracy": float(self.val_accuracy),
                "val_accuracy_ft_target": float(self.val_accuracy_ft_target), "safe": bool(self.safe),
                "val_acc_drop_se": float(self.val_acc_drop_se) if math.isfinite(self.val_acc_drop_se) else None,
                "n_val": int(self.n_val),
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
    curv = curvature_for(target, curvature, tau)
    cands = candidates(method, tau, curv, lambda2, grid, mixes)
    images = ws.target_set(target, CHOICE_SPLIT, n_images)
    if images.split != CHOICE_SPLIT or images.phi is not None or len(images.y) == 0:
        raise DataError(f"repair choices read only labelled '{CHOICE_SPLIT}' images of '{target}'")
    ft_t = ws.vector(target, "ft")
    base_correct, base_loss = correct_and_loss(ws, target, ws.state(ft_t), images)
    base_acc = float(base_correct.double().mean())
    rows = []
    for c in cands:
        correct, loss = correct_and_loss(ws, target, transferred_state(ws, ft_t, c.vector, lambda1, c.scale), images)
        acc = float(correct.double().mean())
        kept = acc / base_acc if base_acc > 0 else math.nan
        rows.append({"method": c.method, "param": c.param, "scale": c.scale,
                     "predicted_loss_increase": c.predicted_loss_increase, "risk_source": c.risk_source,
                     **dict(zip(("measured_loss_increase", "measured_loss_increase_se"),
                                paired_change(base_loss.numpy(), loss.numpy()))),
                     "size": c.size, "val_accuracy": acc,
                     "acc_kept": kept, "acc_drop": 1.0 - kept,
                     "acc_drop_se": paired_drop(base_correct.numpy(), correct.numpy()).se, "n_val": len(correct),
                     "keeps": bool(1.0 - kept <= max_acc_drop + BUDGET_TOL)})
    table = _mark_safe(pd.DataFrame(rows), by_param=method in MIX_METHODS, budget=max_acc_drop)
    best = _best(table)
    return RepairChoice(target, cands[best], float(table.at[best, "val_accuracy"]), base_acc,
                        float(table.at[best, "measured_loss_increase"]), bool(table.at[best, "safe"]), max_acc_drop,
                        table, float(table.at[best, "acc_drop_se"]), len(base_correct),
                        float(table.at[best, "measured_loss_increase_se"]))


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


def method_mixes(method: str, ws: Workspace, target: str, sources: Sequence[str],
                 predicted_gain: Mapping[str, float] | None = None) -> dict[str, TaskVector]:
    """The mixtures of a multi-source method: ``mix`` and ``mix-matched`` → ``{"universal"}``, the uniform mix
    of the other domains (:func:`diag.transfer.mixing.universal`; ``mix-matched`` puts it at the source's
    step, :func:`diag.transfer.methods.matched_scale`); ``mix-ranked`` and ``mix-ranked-matched`` (the
    same at the source's step) → ``{"ranked"}``. The target is
    dropped from ``sources`` (its τ* needs its explanations).

    ``ranked`` is Σ wₛ τ*ˢ with wₛ = :func:`diag.transfer.mixing.mix_weights` of ``predicted_gain``
    (the ranker's gains for ``target``, fitted without the target's pairs). When no source has a
    positive predicted gain the ranker says "transfer nothing": ``ranked`` is then the zero vector
    (the transferred model is θ_ftᵀ itself, whatever λ2).

    Raises:
        DataError: ``mix-ranked`` without gains.
    """
    if method not in MIX_METHODS:
        raise unknown("multi-source method", method, MIX_METHODS)
    vectors = {s: ws.vector(s, "star") for s in sources if s != target}
    if method not in RANKED_METHODS:
        return {"universal": mixing.universal(vectors, target)}
    if predicted_gain is None:
        raise DataError(f"{method} needs the ranker's predicted gains for '{target}'")
    w = mixing.mix_weights({s: predicted_gain.get(s, 0.0) for s in vectors}, target)
    if not w:
        zero = 0.0 * next(iter(vectors.values()))
        return {"ranked": TaskVector(dict(zero.tensors), zero.base_hash, {"derived": "no positive predicted gain"})}
    return {"ranked": mixing.mix(vectors, w, target)}
