"""The risk R(tau; H) = tau^T H tau of adding a task vector to a target model (paper eq. 12, 16-19).

By the quadratic model of the target classification loss around ``theta_ft^T``
(eq. 13), adding ``lambda * tau`` raises the loss by

    L(theta + lambda tau) - L(theta) ~= lambda g^T tau + 1/2 lambda^2 R(tau; H),

the paper's model dropping ``g`` (``g ~= 0`` at a fine-tuned minimum). On held-out images
``g`` is not 0, and small increases are dominated by ``lambda g^T tau``: :func:`loss_model` is
the one place both terms are written (every prediction of a loss increase and every λ cap
calls it). With ``H = U diag(lambda_i) U^T`` and ``a_i = u_i^T tau`` (eq. 17-18),
``R = sum_i lambda_i a_i^2`` (eq. 19).

Three ways to evaluate R, from most to least data:

* :func:`risk_exact`: one Hessian-vector product on target data;
* :func:`risk_diagonal`: ``sum_i diag(H)_i tau_i^2`` from a stored diagonal
  (:func:`risk_diagonal_estimate`: the same with a standard error from the per-probe
  scalars ``r_k``, :func:`risk_diagonal_stderr`);
* :meth:`diag.curvature.card.HessianCard.risk`: top-k eigenpairs plus residual diagonal.

:func:`rank_agreement` says how well an approximation ranks candidate vectors
against the exact R; :func:`quadratic_check` compares the loss model with the
measured loss change, cross-fitted: g and R from one set of images, the change measured on another.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from diag.curvature.operators import CurvatureOperator, HessianOperator
from diag.curvature.results import DiagonalEstimate, TraceEstimate
from train.errors import BaseMismatchError, TvdiagError

__all__ = [
    "QuadraticCheckRow",
    "RiskResult",
    "eigen_contributions",
    "loss_model",
    "probe_risks",
    "quadratic_check",
    "rank_agreement",
    "risk_diagonal",
    "risk_diagonal_estimate",
    "risk_diagonal_stderr",
    "risk_exact",
]


def loss_model(lam: float, risk: float, g_tau: float | None = 0.0) -> float:
    """Predicted loss change ``L(θ + λτ) − L(θ) ≈ λ·gᵀτ + ½·λ²·R`` with ``R = τᵀHτ`` (eq. 13).

    The one loss model of tvdiag: ``g_tau`` = gᵀτ is the first-order term (g the gradient of the
    target loss at θ_ftᵀ, estimated on images other than those the change is scored on);
    ``None`` or 0 gives the paper's ½λ²R.

    >>> loss_model(0.5, 2.0, 0.1)
    0.3
    """
    return lam * (0.0 if g_tau is None else g_tau) + 0.5 * lam * lam * risk


def _as_flat(op_or_layout, tau: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(tau, Mapping):
        if not hasattr(op_or_layout, "flatten"):
            raise TvdiagError(f"{type(op_or_layout).__name__} has no parameter layout; pass tau as a flat tensor.")
        return op_or_layout.flatten(tau)
    return tau.reshape(-1)


def risk_exact(op: CurvatureOperator, tau: Tensor | Mapping[str, Tensor]) -> float:
    """Exact ``R(tau; H) = tau^T H tau`` with one product and a float64 reduction.

    Args:
        op: Curvature operator of the target (usually a :class:`HessianOperator`).
        tau: Flat ``(D,)`` vector, or a ``name -> tensor`` dict (restricted to the
            operator's parameters; extra names are ignored).

    Raises:
        BaseMismatchError: ``tau`` does not have the operator's length or names.
    """
    flat = _as_flat(op, tau)
    if flat.shape[0] != op.shape[0]:
        raise BaseMismatchError(f"tau has length {flat.shape[0]}, the operator has D={op.shape[0]}.")
    return op.quadratic_form(flat)


def risk_diagonal(diag: Tensor, tau: Tensor) -> float:
    """Diagonal approximation ``R_diag = sum_i diag_i tau_i^2`` (float64).

    Raises:
        BaseMismatchError: the lengths differ.
    """
    d, t = diag.reshape(-1), tau.reshape(-1)
    if d.shape != t.shape:
        raise BaseMismatchError(f"diag has length {d.shape[0]}, tau has {t.shape[0]}.")
    return float((d.double() * t.double().pow(2)).sum())


def risk_diagonal_estimate(est: DiagonalEstimate, tau: Tensor, column: int | None = None) -> TraceEstimate:
    """``R_diag = Σ_i diag_i τ_i²`` from a Hutchinson diagonal, with its standard error from the probes.

    Probe ``k`` gives its own diagonal ``d_k = v_k ⊙ A v_k`` and so its own risk value
    ``r_k = d_kᵀ(τ ⊙ τ) = Σ_i d_k,i τ_i²``; the estimate is their mean (= :func:`risk_diagonal`
    of ``est.mean``). The ``r_k`` are i.i.d. over probes, so ``Var(mean) = Var(r_k)/n``,
    estimated by ``s_r²/n`` with ``s_r`` their sample standard deviation
    (:func:`risk_diagonal_stderr`): ``s_r² = (τ²)ᵀ Ĉ (τ²)`` with ``Ĉ`` the sample covariance of
    the ``d_k`` — the correlation between diagonal entries that ``sqrt(Σ_i τ_i⁴ stderr_i²)``
    would ignore. Only the ``n`` scalars ``r_k`` are needed: accumulated during the run with
    ``hutchinson_diagonal(..., functionals=τ²)`` (``column`` names which), or from the
    ``(n, D)`` per-probe diagonals of ``keep_probes=True``. Since ``E[d_k] = diag(A)``,
    :meth:`TraceEstimate.ci95` covers ``Σ_i A_ii τ_i²`` at the nominal rate (Student t,
    n − 1 dof). An exact diagonal gives stderr 0.

    Args:
        est: A Hutchinson :class:`DiagonalEstimate` with ``probe_functionals`` or
            ``probe_diagonals`` (or an exact one).
        tau: ``(D,)`` vector.
        column: The column of ``est.probe_functionals`` accumulated with ``τ²`` (None: use
            ``est.probe_diagonals``).

    Returns:
        :class:`TraceEstimate` with ``method="diag-risk"`` and the ``r_k`` as ``probe_values``.

    Raises:
        BaseMismatchError: the lengths differ.
        TvdiagError: a Hutchinson estimate with neither, or a column whose mean is not ``R_diag``
            of ``est.mean`` (accumulated with another vector).
    """
    t2 = tau.reshape(-1).double().pow(2)
    if t2.shape[0] != est.dim:
        raise BaseMismatchError(f"diag has length {est.dim}, tau has {t2.shape[0]}.")
    if est.method == "exact":
        return TraceEstimate(risk_diagonal(est.mean, tau), 0.0, est.n_matvecs, "diag-risk", 0)
    if column is not None:
        if est.probe_functionals is None or not 0 <= column < est.probe_functionals.shape[1]:
            raise TvdiagError(f"This diagonal estimate has no functional column {column}; run "
                              "hutchinson_diagonal(..., functionals=tau**2).")
        r = est.probe_functionals[:, column].double()
        want, scale = risk_diagonal(est.mean, tau), float((est.mean.double().abs().cpu() * t2.cpu()).sum())
        if abs(float(r.mean()) - want) > 1e-9 * scale:
            raise TvdiagError(f"Functional column {column} was not accumulated with this tau (its mean "
                              f"{float(r.mean()):.6g} ≠ R_diag {want:.6g}).")
    elif est.probe_diagonals is not None:
        r = probe_risks(est.probe_diagonals, tau)
    else:
        raise TvdiagError("This diagonal estimate has neither per-probe functionals nor diagonals; run "
                          "hutchinson_diagonal(..., functionals=tau**2) to get a standard error of R_diag.")
    n = int(r.shape[0])
    return TraceEstimate(float(r.mean()), risk_diagonal_stderr(r), est.n_matvecs, "diag-risk", n, r.cpu(), est.seed)


def probe_risks(probe_diagonals: Tensor, tau: Tensor) -> Tensor:
    """``r_k = Σ_i d_k,i τ_i²`` for each probe's diagonal ``d_k`` (rows of ``probe_diagonals``), float64."""
    t2 = tau.reshape(-1).double().pow(2)
    if probe_diagonals.ndim != 2 or probe_diagonals.shape[1] != t2.shape[0]:
        raise BaseMismatchError(f"probe diagonals have shape {tuple(probe_diagonals.shape)}, tau has length "
                                f"{t2.shape[0]}.")
    return probe_diagonals.double() @ t2.to(probe_diagonals.device)


def risk_diagonal_stderr(probe_risks: Tensor) -> float:
    """Standard error ``s_r / √n`` of ``R_diag = mean_k r_k`` from the ``n`` per-probe risks ``r_k``.

    As in :func:`risk_diagonal_estimate`: ``r_k = Σ_i d_k,i τ_i²`` (``d_k = v_k ⊙ A v_k``), from
    ``hutchinson_diagonal(..., functionals=τ²)`` or :func:`probe_risks`; ``s_r`` their sample
    standard deviation. Zero when every probe gives the same diagonal (a diagonal ``A``:
    ``v ⊙ A v = diag(A)`` for every ±1 vector); NaN with one probe.
    """
    r = probe_risks.reshape(-1).double()
    n = int(r.shape[0])
    return float(r.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan


def eigen_contributions(eigvals: Tensor, eigvecs: Tensor, tau: Tensor) -> tuple[Tensor, float]:
    """Contributions ``lambda_i a_i^2`` (eq. 19) of each eigenpair to R, with ``a_i = u_i^T tau``.

    Args:
        eigvals: ``(k,)`` eigenvalues.
        eigvecs: ``(D, k)`` orthonormal eigenvectors (columns).
        tau: ``(D,)`` vector.

    Returns:
        ``(contrib, remainder)``: ``contrib`` is a float64 ``(k,)`` tensor of
        ``lambda_i a_i^2`` (``R`` = their sum when k = D); ``remainder`` is
        ``|tau - U a|^2``, the squared norm of the part of ``tau`` outside the span of
        the eigenvectors, whose curvature the pairs do not describe.
    """
    U, t = eigvecs.double(), tau.reshape(-1).double().to(eigvecs.device)
    if U.ndim != 2 or U.shape[0] != t.shape[0] or U.shape[1] != eigvals.shape[0]:
        raise BaseMismatchError(f"Shapes do not fit: eigvals {tuple(eigvals.shape)}, eigvecs {tuple(eigvecs.shape)}, "
                                f"tau {tuple(tau.shape)}.")
    a = U.T @ t
    contrib = eigvals.double().to(a.device) * a.pow(2)
    remainder = float((t - U @ a).pow(2).sum())
    return contrib, remainder


@dataclass
class RiskResult:
    """R(tau; H) by the available methods (None where not computed).

    Attributes:
        exact: ``tau^T H tau`` by an HVP on target data.
        diag: ``sum_i diag(H)_i tau_i^2``.
        card: Hessian-card estimate ``sum l_i (v_i^T tau)^2 + sum r_i tau_i^2``.
        diag_stderr: Standard error of ``diag`` when the diagonal is a stochastic estimate.
        g_tau: ``g^T tau``, the first-order term (None: unknown, the model is ½λ²R alone).
    """

    exact: float | None = None
    diag: float | None = None
    card: float | None = None
    diag_stderr: float | None = None
    g_tau: float | None = None

    def loss_increase(self, lam: float, method: str = "exact") -> float | None:
        """Predicted loss increase :func:`loss_model` ``λ gᵀτ + ½ λ² R`` for one method's R."""
        if method not in ("exact", "diag", "card"):
            raise TvdiagError(f"Unknown risk method '{method}'. Available: card, diag, exact")
        r = getattr(self, method)
        return None if r is None else loss_model(lam, r, self.g_tau)

    def to_dict(self) -> dict:
        """``{"exact", "diag", "card", "diag_stderr"}``, for a pandas row."""
        return asdict(self)

    def __repr__(self) -> str:
        fmt = lambda x: "None" if x is None else f"{x:.6g}"
        se = "" if self.diag_stderr is None else f" ± {self.diag_stderr:.2g}"
        return f"RiskResult(exact={fmt(self.exact)}, diag={fmt(self.diag)}{se}, card={fmt(self.card)})"


@dataclass
class QuadraticCheckRow:
    """One step ``t`` of :func:`quadratic_check`.

    Attributes:
        t: Step along tau.
        measured: ``L(theta + t tau) - L(theta)``.
        first_order: ``t g^T tau``.
        second_order: ``1/2 t^2 R``.
        predicted: ``first_order + second_order``.
        rel_error: ``|predicted - measured| / |measured|``.
        rel_error_second_order: ``|second_order - measured| / |measured|`` (the paper's
            model, which assumes g = 0).
        holds: ``rel_error <= tol``.
        measured_se: the paired standard error of ``measured`` over its images (each image's loss
            at both points).
        measured_half_a, measured_half_b: ``measured`` on the alternate-image halves of the scoring
            images: two independent measurements of the same change (the measurement's test–retest).
        g_tau, g_tau_se: ``g^T tau`` and its standard error over the estimating images (each image's
            directional derivative).
        logit_predicted, logit_predicted_se: the logit-space loss model
            (:mod:`~diag.curvature.operators.logit_taylor`, from the estimating images) and its standard
            error over them.
        estimate_measured: the change measured on the estimating images themselves (what the models
            expand; equal to ``measured`` without ``score_data``).
        logit_valid: the logit model is within ×1.5 of ``estimate_measured`` at this ``t`` and every
            smaller one of the check: where its expansion holds on its own images, the range it
            declares valid (decided without the scoring images).
    """

    t: float
    measured: float
    first_order: float
    second_order: float
    predicted: float
    rel_error: float
    rel_error_second_order: float
    holds: bool
    measured_se: float = math.nan
    measured_half_a: float = math.nan
    measured_half_b: float = math.nan
    g_tau: float = math.nan
    g_tau_se: float = math.nan
    logit_predicted: float = math.nan
    logit_predicted_se: float = math.nan
    estimate_measured: float = math.nan
    logit_valid: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def quadratic_check(model: nn.Module, data: Iterable, tau: Tensor | Mapping[str, Tensor],
                    ts: Sequence[float] = (0.1, 0.25, 0.5, 1.0), params=None, tol: float = 0.1,
                    op: HessianOperator | None = None, score_data: Iterable | None = None,
                    **op_kwargs) -> list[QuadraticCheckRow]:
    """Compare the loss model (:func:`loss_model`) with the measured loss change along tau, cross-fitted.

    ``g`` and ``R = tau^T H tau`` come from ``data`` (or ``op``); for each ``t`` the change
    ``L(theta + t tau) - L(theta)`` is measured on ``score_data`` — other images, so that the
    model is never scored on the images it was estimated on — and compared with
    ``t g^T tau + 1/2 t^2 R`` and with the logit-space model (the logits' second-order expansion under
    the exact cross-entropy, :mod:`~diag.curvature.operators.logit_taylor`); each measured change carries its paired standard error and its two
    alternate-image halves, and ``g^T tau`` its standard error over the estimating images. Without
    ``score_data`` the change is measured on ``data`` (an in-sample check of the Taylor expansion
    itself, not of a prediction).

    Args:
        model: The target model (at ``theta``; never modified).
        data: Target batches ``(x, y)`` that estimate g and H.
        tau: Flat vector in the operator's order or a ``name -> tensor`` dict.
        ts: Steps (the rows come in increasing ``t``).
        params: Parameter globs (ignored when ``op`` is given).
        tol: Relative error up to which a row counts as ``holds``.
        op: A ready :class:`HessianOperator` on the same model and data (reused).
        score_data: Batches ``(x, y)`` the measured change is scored on (disjoint from ``data``).
        **op_kwargs: Passed to :class:`HessianOperator` (``dtype``, ``engine``, ...).

    Returns:
        One :class:`QuadraticCheckRow` per ``t``.
    """
    if op is None:
        op = HessianOperator(model, data, params=params, **op_kwargs)
    flat = _as_flat(op, tau).to(dtype=op.dtype, device=op.device)
    if flat.shape[0] != op.shape[0]:
        raise BaseMismatchError(f"tau has length {flat.shape[0]}, the operator has D={op.shape[0]}.")
    scorer = op if score_data is None else HessianOperator(op.model, score_data, params=list(op.param_names),
                                                            engine=op.engine, dtype=op.dtype)
    if hasattr(op, "directional_derivative"):
        g_tau, g_tau_se = op.directional_derivative(flat)
    else:
        g_tau, g_tau_se = float(torch.dot(op.gradient().double(), flat.double())), math.nan
    R = op.quadratic_form(flat)
    logit = op.logit_taylor(flat) if hasattr(op, "logit_taylor") else None
    rows, valid = [], True
    for t in sorted(ts):
        change = scorer.loss_change(t * flat)
        measured = change.mean
        first, second = t * g_tau, loss_model(t, R, 0.0)
        denom = abs(measured) if measured != 0 else math.inf
        rel = abs(first + second - measured) / denom
        rel2 = abs(second - measured) / denom
        extra = {}
        if logit is not None:
            pred = logit.change(t)
            own = measured if scorer is op else op.loss_change(t * flat).mean
            valid = valid and logit.holds(t, own)
            extra = {"logit_predicted": pred.mean, "logit_predicted_se": pred.se, "estimate_measured": own,
                     "logit_valid": bool(valid)}
        rows.append(QuadraticCheckRow(float(t), measured, first, second, first + second, rel, rel2, bool(rel <= tol),
                                      change.se, change.half_a, change.half_b, g_tau, g_tau_se, **extra))
    return rows


def rank_agreement(exact: Sequence[float], approx: Sequence[float]) -> dict:
    """Rank agreement of approximate risks with exact risks over candidate vectors.

    Returns:
        ``{"spearman": rho, "kendall": tau_b}`` (NaN when fewer than 2 candidates or
        a constant input).
    """
    e, a = np.asarray(exact, dtype=np.float64), np.asarray(approx, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1:
        raise BaseMismatchError(f"exact and approx must be equal-length lists, got {e.shape} and {a.shape}.")
    if e.size < 2 or np.ptp(e) == 0 or np.ptp(a) == 0:
        return {"spearman": float("nan"), "kendall": float("nan")}
    from scipy import stats  # seconds to import: only here

    return {"spearman": float(stats.spearmanr(e, a).statistic), "kendall": float(stats.kendalltau(e, a).statistic)}
