"""The logit-space loss model: the logits' second-order expansion along τ under the exact cross-entropy.

The quadratic loss model ΔL̂(λ) = λ·gᵀτ + ½λ²·τᵀHτ expands the loss itself. Near a fine-tuned point
most of the loss's growth along τ comes from the softmax, not from the network: an image's
cross-entropy grows like a log-sum-exp of its logits, far faster than a parabola once its margin
shrinks. The logit model expands the logits instead and keeps the cross-entropy exact,

    z_i(λ) ≈ z_i + λ·a_i + ½λ²·b_i,   a_i = J_i τ,   b_i = τᵀ ∇²z_i τ   (per class),
    ΔL̂(λ) = (1/N) Σ_i CE(z_i(λ), y_i) − CE(z_i, y_i),

from one nested forward-mode product per batch (no Hessian product). Its own expansion to λ² is
exactly the quadratic model's — gᵀτ = mean sᵢᵀaᵢ and τᵀHτ = mean aᵢᵀ(diag pᵢ − pᵢpᵢᵀ)aᵢ + sᵢᵀbᵢ with
sᵢ = pᵢ − onehot(yᵢ) (:meth:`LogitTaylor.taylor`) — so the two agree for small λ and differ only in
the higher orders the softmax adds. For a model whose logits are linear in the parameters
(b = 0) it is exact at every λ.

torch 2.14's nested forward-mode derivative of ``layer_norm`` is wrong (pytorch#196700: its second-order
JVP treats the saved mean and inverse std as constants), so :func:`composite_layer_norm` routes every
``F.layer_norm`` call (open_clip's LayerNorm and ``nn.LayerNorm`` both call it) through the same formula
written in differentiable primitives while b is computed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diag.curvature.operators.change import LossChange
from diag.runtime.distributed import all_reduce_sum

__all__ = ["LogitTaylor", "composite_layer_norm"]


def _layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    out = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


@contextlib.contextmanager
def composite_layer_norm() -> Iterator[None]:
    """``F.layer_norm`` as mean, variance and rsqrt (exact nested forward mode); restored on exit."""
    native = F.layer_norm
    F.layer_norm = _layer_norm
    try:
        yield
    finally:
        F.layer_norm = native


@dataclass(frozen=True)
class LogitTaylor:
    """Each image's logits, their first and second derivative along τ, and its label (float64, ``(N, C)``).

    Built by :meth:`diag.curvature.operators.model._ModelOperator.logit_taylor`. ``even`` marks the
    images of the first alternate half (even positions in each batch, as in
    :meth:`~diag.curvature.operators.model._ModelOperator.loss_change`); ``data_parallel``: the
    images are this rank's share and the means are all-reduced over ranks.
    """

    logits: Tensor
    slope: Tensor
    curvature: Tensor
    labels: Tensor
    even: Tensor
    data_parallel: bool = False

    def _mean(self, per_image: Tensor) -> Tensor:
        """Means over every image (all ranks) of the columns of ``per_image`` ``(N, k)``."""
        sums = torch.cat([per_image.sum(0), torch.tensor([float(per_image.shape[0])], dtype=per_image.dtype)])
        if self.data_parallel:
            sums = all_reduce_sum(sums)
        if sums[-1] == 0:
            raise ValueError("LogitTaylor holds no images.")
        return sums[:-1] / sums[-1]

    def per_image_change(self, lam: float, second_order: bool = True) -> Tensor:
        """Each image's predicted CE(z(λ)) − CE(z); ``second_order`` False drops b (logits linear in λ)."""
        z = self.logits + lam * self.slope
        if second_order:
            z = z + 0.5 * lam * lam * self.curvature
        return F.cross_entropy(z, self.labels, reduction="none") - F.cross_entropy(self.logits, self.labels,
                                                                                   reduction="none")

    def change(self, lam: float, second_order: bool = True) -> LossChange:
        """The predicted mean loss change at λ as a :class:`~diag.curvature.operators.change.LossChange`: its
        standard error is over the images (the prediction's own sampling noise) and its halves those of the
        alternate images."""
        d = self.per_image_change(lam, second_order)
        even = self.even.to(d.dtype)
        moments = self._mean(torch.stack([d, d * d, d * even, even, d * (1 - even)], dim=1))
        return LossChange.from_moments(moments, self.num_images)

    @property
    def num_images(self) -> int:
        """N over every rank."""
        n = torch.tensor([float(self.labels.shape[0])], dtype=torch.float64)
        return int(all_reduce_sum(n).item()) if self.data_parallel else int(n.item())

    def taylor(self) -> tuple[float, float]:
        """(gᵀτ, τᵀHτ) of the mean cross-entropy, from the logit terms (the quadratic model's two numbers)."""
        p = torch.softmax(self.logits, dim=1)
        s = p - F.one_hot(self.labels, p.shape[1]).to(p.dtype)
        ga = (s * self.slope).sum(1)
        fisher = (p * self.slope * self.slope).sum(1) - (p * self.slope).sum(1) ** 2
        g_tau, risk = self._mean(torch.stack([ga, fisher + (s * self.curvature).sum(1)], dim=1)).tolist()
        return float(g_tau), float(risk)

    def __repr__(self) -> str:
        g_tau, risk = self.taylor()
        n, c = self.logits.shape
        return f"LogitTaylor(images={n}, classes={c}, g_tau={g_tau:.6g}, risk={risk:.6g})"

    def holds(self, lam: float, measured: float, within: float = 1.5) -> bool:
        """Whether the model at λ is within ×``within`` of ``measured``, a change measured on these same images."""
        pred = self.change(lam).mean
        return pred != 0 and math.isfinite(measured) and 1 / within <= measured / pred <= within

    def valid_up_to(self, measured: dict[float, float], within: float = 1.5) -> float:
        """The largest step of ``measured`` (step -> the change measured on these same images) up to which the
        model :meth:`holds` at that step and every smaller one: where its own expansion holds on the images
        it was built from (0.0 when it fails at the smallest step)."""
        ok = 0.0
        for lam in sorted(measured):
            if not self.holds(lam, measured[lam], within):
                break
            ok = lam
        return ok
