"""Curvature of the classification loss: operators, estimators, risk and the Hessian card.

Operators (``op @ v``, ``op.to_scipy()``, ``op.to_dense()``) over any module and any
parameter subset; risk ``R(tau; H) = tau^T H tau`` (paper eq. 12, 16-19); the
publishable :class:`HessianCard`.
"""

from diag.curvature.card import build_card, HessianCard
from diag.curvature.data_variance import trace_with_data_variance
from diag.curvature.exact import exact_diagonal, exact_trace
from diag.curvature.hutchinson import hutchinson_diagonal, hutchinson_trace
from diag.curvature.hutchpp import hutchpp_trace
from diag.curvature.lanczos import gradient_start, lanczos_topk, slq_density
from diag.curvature.operators import (CurvatureOperator, DenseOperator, EmpiricalFisherOperator, exact_ggn_diagonal,
                                      finite_difference_check, GGNOperator, HessianOperator)
from diag.curvature.operators.attention import curvature_mode
from diag.curvature.params import layout_for, ParamLayout, select_params
from diag.curvature.results import DiagonalEstimate, EigenResult, SpectralDensity, TraceEstimate
from diag.curvature.risk import (eigen_contributions, quadratic_check, QuadraticCheckRow, rank_agreement,
                                 probe_risks, risk_diagonal, risk_diagonal_estimate, risk_diagonal_stderr, risk_exact,
                                 RiskResult)

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
    "lanczos_topk",
    "layout_for",
    "probe_risks",
    "quadratic_check",
    "rank_agreement",
    "risk_diagonal",
    "risk_diagonal_estimate",
    "risk_diagonal_stderr",
    "risk_exact",
    "select_params",
    "slq_density",
    "trace_with_data_variance",
]
