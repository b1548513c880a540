"""Generalised Gauss-Newton operator of the cross-entropy loss and its exact diagonal.

``G = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` with ``J_i = d f(theta, x_i) / d theta``
and ``p_i = softmax(f(theta, x_i))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from diag.curvature.operators.model import _ModelOperator

__all__ = ["GGNOperator", "exact_ggn_diagonal"]


class GGNOperator(_ModelOperator):
    """Generalised Gauss-Newton ``G = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` for cross-entropy.

    One product per batch: ``J v`` by ``torch.func.jvp``, the output Hessian of CE
    (``diag(p) - p p^T`` per sample, independent of the label), then ``J^T (.)`` by
    ``torch.func.vjp``. ``G`` is positive semi-definite.
    """

    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]], index: int | None = None) -> Tensor:
        f = lambda th: self._logits(th, x)
        z, vjp_fn = torch.func.vjp(f, self._theta)
        p = torch.softmax(z.detach(), dim=-1)
        cols = []
        for v in vs:
            jv = torch.func.jvp(f, (self._theta,), (v,))[1]
            hjv = p * jv - p * (p * jv).sum(-1, keepdim=True)
            cols.append(self.flatten(vjp_fn(hjv)[0]))
        return torch.stack(cols, dim=1)

    def diagonal(self, chunk_size: int | None = None) -> Tensor:
        """Exact ``diag(G)``, using that ``diag(p) - p p^T = S S^T`` with
        ``S[:, c] = sqrt(p_c) (e_c - p)`` (rank C - 1).

        ``diag(G) = (1/N) sum_i sum_c (J_i^T S_i[:, c])^2``: one per-sample
        vector-Jacobian product (``vmap`` of ``grad``) per class per batch.

        Args:
            chunk_size: ``torch.func.vmap`` chunk size (bounds memory at
                ``chunk_size x D``); None vectorises the whole batch.
        """

        def per_sample(th: dict[str, Tensor], xi: Tensor, si: Tensor) -> Tensor:
            return (self._logits(th, xi.unsqueeze(0))[0] * si).sum()

        per_sample_vjp = torch.func.vmap(torch.func.grad(per_sample), in_dims=(None, 0, 0), chunk_size=chunk_size)

        def per_batch(x: Tensor, y: Tensor) -> Tensor:
            with torch.no_grad():
                p = torch.softmax(self._logits(self._theta, x), dim=-1)
            C = p.shape[1]
            total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
            sq = p.sqrt()
            for c in range(C):
                s = -p * sq[:, c:c + 1]
                s[:, c] += sq[:, c]
                g = per_sample_vjp(self._theta, x, s)
                total += torch.cat([g[n].pow(2).sum(0).reshape(-1) for n in self.param_names])
            return total

        like = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        return self._reduce(per_batch, like)



def exact_ggn_diagonal(model: nn.Module, data: Iterable, params: str | Sequence[str] | None = None,
                       point: Mapping[str, Tensor] | None = None, dtype: torch.dtype | None = None,
                       shard: bool = False, chunk_size: int | None = None,
                       data_parallel: bool | None = None) -> Tensor:
    """Exact diagonal of the cross-entropy GGN (see :meth:`GGNOperator.diagonal`).

    Costs ``C`` per-sample vector-Jacobian products per batch (``C`` = number of
    classes), so it is meant for class counts up to a few dozen.

    Returns:
        ``(D,)`` tensor in the operator's flat order.
    """
    op = GGNOperator(model, data, params=params, point=point, dtype=dtype, shard=shard, data_parallel=data_parallel)
    return op.diagonal(chunk_size=chunk_size)


