"""Empirical Fisher operator ``F = (1/N) sum_i g_i g_i^T`` with per-sample gradients ``g_i = d CE_i / d theta``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diag.curvature.operators.model import _ModelOperator

__all__ = ["EmpiricalFisherOperator"]


class EmpiricalFisherOperator(_ModelOperator):
    """Empirical Fisher ``F = (1/N) sum_i g_i g_i^T`` with per-sample gradients ``g_i = grad CE_i``.

    ``F v = (1/N) J_l^T (J_l v)`` where ``J_l`` is the Jacobian of the per-sample loss
    vector: one ``jvp`` gives all ``g_i . v`` and one ``vjp`` sums ``g_i (g_i . v)``,
    so no ``B x D`` per-sample gradient matrix is formed. :meth:`diagonal` does form
    per-sample gradients (``vmap`` of ``grad``).
    """

    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]], index: int | None = None) -> Tensor:
        f = lambda th: self._per_sample_losses(th, x, y)
        _, vjp_fn = torch.func.vjp(f, self._theta)
        cols = []
        for v in vs:
            gv = torch.func.jvp(f, (self._theta,), (v,))[1]
            cols.append(self.flatten(vjp_fn(gv)[0]))
        return torch.stack(cols, dim=1)

    def diagonal(self, chunk_size: int | None = None) -> Tensor:
        """Exact ``diag(F) = (1/N) sum_i g_i^2``."""

        def one(th: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return F.cross_entropy(self._logits(th, xi.unsqueeze(0)), yi.unsqueeze(0))

        psg = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)
        like = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        return self._reduce(
            lambda x, y: torch.cat([g.pow(2).sum(0).reshape(-1) for g in
                                    (psg(self._theta, x, y)[n] for n in self.param_names)]), like)


