"""Curvature of the classification loss: operators, estimators, risk and the Hessian card.

Operators (``op @ v``, ``op.to_scipy()``, ``op.to_dense()``) over any module and any
parameter subset; risk ``R(tau; H) = tau^T H tau`` (paper eq. 12, 16-19); the
publishable :class:`HessianCard`.
"""

from diag.curvature.attention import curvature_mode
from diag.curvature.card import HessianCard, build_card
from diag.curvature.data_variance import trace_with_data_variance
from diag.curvature.distributed import all_reduce_sum, broadcast, is_distributed, rank_and_world, shard_batches
from diag.curvature.estimators import (
    exact_diagonal,
    exact_trace,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
)
from diag.curvature.lanczos import gradient_start, lanczos_topk, slq_density
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
from diag.curvature.results import DiagonalEstimate, EigenResult, SpectralDensity, TraceEstimate
from diag.curvature.risk import (
    QuadraticCheckRow,
    RiskResult,
    eigen_contributions,
    quadratic_check,
    rank_agreement,
    risk_diagonal,
    risk_diagonal_estimate,
    risk_diagonal_stderr,
    risk_exact,
)

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalEstimate",
    "EigenResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianCard",
    "HessianOperator",
    "ParamLayout",
    "QuadraticCheckRow",
    "RiskResult",
    "SpectralDensity",
    "TraceEstimate",
    "all_reduce_sum",
    "broadcast",
    "build_card",
    "curvature_mode",
    "eigen_contributions",
    "exact_diagonal",
    "exact_ggn_diagonal",
    "exact_trace",
    "finite_difference_check",
    "gradient_start",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "is_distributed",
    "lanczos_topk",
    "layout_for",
    "quadratic_check",
    "rank_agreement",
    "rank_and_world",
    "risk_diagonal",
    "risk_diagonal_estimate",
    "risk_diagonal_stderr",
    "risk_exact",
    "select_params",
    "shard_batches",
    "slq_density",
    "trace_with_data_variance",
]
