"""Curvature of the classification loss: operators, estimators, risk and the Hessian card.

Operators (``op @ v``, ``op.to_scipy()``, ``op.to_dense()``) over any module and any
parameter subset; risk ``R(tau; H) = tau^T H tau`` (paper eq. 12, 16-19); the
publishable :class:`HessianCard`.
"""

from diag.curvature.attention import curvature_mode
from diag.curvature.card import HessianCard, build_card
from diag.curvature.distributed import all_reduce_sum, broadcast, is_distributed, rank_and_world, shard_batches
from diag.curvature.operators import (
    CurvatureOperator,
    DenseOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    exact_ggn_diagonal,
    finite_difference_check,
)
from diag.curvature.params import ParamLayout, layout_for, select_params
from diag.curvature.risk import (
    QuadraticCheckRow,
    RiskResult,
    eigen_contributions,
    quadratic_check,
    rank_agreement,
    risk_diagonal,
    risk_diagonal_estimate,
    risk_exact,
)

from diag.curvature.estimators import (
    exact_diagonal,
    exact_trace,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    trace_with_data_variance,
)
from diag.curvature.lanczos import lanczos_topk, slq_density
from diag.curvature.results import DiagonalEstimate, EigenResult, SpectralDensity, TraceEstimate

__all__ = [
    # estimators
    "exact_diagonal",
    "exact_trace",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "trace_with_data_variance",
    "lanczos_topk",
    "slq_density",
    "TraceEstimate",
    "DiagonalEstimate",
    "EigenResult",
    "SpectralDensity",
    # operators
    "CurvatureOperator",
    "DenseOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "exact_ggn_diagonal",
    "finite_difference_check",
    # parameters, attention, distributed
    "ParamLayout",
    "select_params",
    "layout_for",
    "curvature_mode",
    "is_distributed",
    "rank_and_world",
    "all_reduce_sum",
    "broadcast",
    "shard_batches",
    # risk and card
    "risk_exact",
    "risk_diagonal",
    "risk_diagonal_estimate",
    "eigen_contributions",
    "RiskResult",
    "QuadraticCheckRow",
    "quadratic_check",
    "rank_agreement",
    "HessianCard",
    "build_card",
    # --- estimator names go here ---
]
