"""Curvature operators: Hessian, generalised Gauss-Newton and empirical Fisher.

Every operator is a symmetric ``D x D`` linear map over a flat parameter vector and
implements one product (:mod:`.base`); the model operators (:mod:`.model`) act on the
mean cross-entropy over a dataset of ``(x, y)`` batches:

* Hessian (:mod:`.hessian`):  H = (1/N) sum_i d^2 CE_i / d theta^2
* GGN (:mod:`.ggn`):      G = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i,  J_i = d f(theta, x_i) / d theta
* Empirical Fisher (:mod:`.fisher`): F = (1/N) sum_i g_i g_i^T,  g_i = d CE_i / d theta
"""

from diag.curvature.operators.base import MAX_DENSE_DIM, CurvatureOperator, DenseOperator
from diag.curvature.operators.fisher import EmpiricalFisherOperator
from diag.curvature.operators.ggn import GGNOperator, exact_ggn_diagonal
from diag.curvature.operators.hessian import DEFAULT_KEEP_GRAPHS, ENGINES, HessianOperator, _sync
from diag.curvature.operators.model import LOSSES, _eval_mode, _ModelOperator, finite_difference_check

__all__ = [
    "DEFAULT_KEEP_GRAPHS",
    "ENGINES",
    "LOSSES",
    "MAX_DENSE_DIM",
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "_ModelOperator",
    "_eval_mode",
    "_sync",
    "exact_ggn_diagonal",
    "finite_difference_check",
]
