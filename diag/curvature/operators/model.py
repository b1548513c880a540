"""Shared machinery of the model operators: parameter subset, evaluation point, data loop, all-reduce.

The model operators act on the classification loss over a dataset of ``(x, y)``
batches,

    L(theta) = (1/N) sum_i CE(f(theta, x_i), y_i),      N = total sample count,

so the operator of the whole dataset is the sample-count-weighted average of the
per-batch operators. Products run inside :func:`~diag.curvature.operators.attention.curvature_mode`
with the model in eval mode (both restored afterwards); the module's parameters are
never modified (the operator evaluates at its own detached copy of the point, through
``torch.func.functional_call``). Under ``torch.distributed`` each rank sums over its
own batches and the products and sample counts are all-reduced, so every rank gets
the same product (the vector ``v`` must be the same on all ranks).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from diag.curvature.operators.attention import curvature_mode
from diag.curvature.operators.change import LossChange, _mean_and_se
from diag.curvature.operators.logit_taylor import LogitTaylor, composite_layer_norm
from diag.runtime.distributed import all_reduce_sum, is_distributed, shard_batches
from diag.curvature.operators.base import CurvatureOperator
from diag.curvature.params import ParamLayout, layout_for, select_params
from train.errors import BaseMismatchError, DataError, TvdiagError, UnknownNameError, unknown

__all__ = ["LOSSES", "LossChange", "finite_difference_check"]

LOSSES = ("ce",)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each module's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def _is_one_shot(data: Any) -> bool:
    try:
        return iter(data) is data
    except TypeError as e:
        raise DataError(f"data must be an iterable of (x, y) batches, got {type(data).__name__}.") from e


class _ModelOperator(CurvatureOperator):
    """Shared machinery: parameter subset, evaluation point, data loop, all-reduce.

    Args:
        model: Module mapping a float batch ``x`` to logits ``(B, C)``.
        data: Re-iterable of ``(x, y)`` batches (a list or a DataLoader); a one-shot
            iterator is materialised into a list (with a warning).
        params: ``None`` (all parameters with ``requires_grad``) or name globs.
        loss: ``"ce"``: cross-entropy, mean over samples.
        point: Optional ``name -> tensor`` values to evaluate at instead of the
            module's own (any parameter name of the model; shapes must match).
        dtype: Compute dtype (parameters, buffers and float inputs are cast);
            default the dtype of the first selected parameter.
        shard: Under torch.distributed, take every ``world_size``-th batch of
            ``data`` (starting at this rank). Leave False when ``data`` is already
            this rank's shard.
        data_parallel: Under torch.distributed, all-reduce products and sample counts
            over ranks (every rank must then call ``op @ v`` with the same ``v``).
            ``None`` (default): whenever a process group is initialised. ``False``:
            each rank's operator covers its own data only (e.g. when probes, not data,
            are split across ranks).
    """

    def __init__(self, model: nn.Module, data: Iterable, params: str | Sequence[str] | None = None,
                 loss: str = "ce", point: Mapping[str, Tensor] | None = None,
                 dtype: torch.dtype | None = None, shard: bool = False,
                 data_parallel: bool | None = None) -> None:
        if loss not in LOSSES:
            raise unknown("loss", str(loss), LOSSES)
        self.model = model
        self.loss_name = loss
        names = select_params(model, params)
        self.layout: ParamLayout = layout_for(model, names)
        named = dict(model.named_parameters())
        first = named[names[0]]
        dtype = dtype or first.dtype
        super().__init__(self.layout.dim, dtype, first.device)
        self._theta, self._frozen = self._split_state(point)
        if _is_one_shot(data):
            warnings.warn("data is a one-shot iterator; materialising it into a list so the operator can reuse it.",
                          stacklevel=3)
            data = list(data)
        self.data = data
        self.shard = bool(shard)
        self._data_parallel = data_parallel
        self.num_samples: int | None = None
        self._gradient_at_point: Tensor | None = None  # :meth:`gradient` at the point, computed once

    @property
    def data_parallel(self) -> bool:
        """True when products are all-reduced over torch.distributed ranks."""
        return is_distributed() if self._data_parallel is None else (bool(self._data_parallel) and is_distributed())

    # -- layout ---------------------------------------------------------------
    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the selected parameters, in flat-vector order."""
        return self.layout.names

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the selected parameters, in flat-vector order."""
        return self.layout.shapes

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``name -> tensor`` dict (extra keys ignored) to a flat ``(D,)`` vector in the operator's dtype."""
        return self.layout.flatten(tensors, dtype=self.dtype, device=self.device)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Flat ``(D,)`` vector to a ``name -> tensor`` dict (views)."""
        return self.layout.unflatten(flat)

    def point(self) -> Tensor:
        """The flat evaluation point ``theta`` of the selected parameters."""
        return self.flatten(self._theta)

    def __repr__(self) -> str:
        extra = f", engine={self.engine!r}" if hasattr(self, "engine") else ""
        return (f"{type(self).__name__}(D={self.shape[0]}, tensors={len(self.param_names)}, "
                f"dtype={self.dtype}, device={self.device}{extra})")

    # -- state ----------------------------------------------------------------
    def _cast(self, t: Tensor) -> Tensor:
        t = t.detach()
        if t.is_floating_point() or t.is_complex():
            return t.to(dtype=self.dtype, device=self.device)
        return t.to(device=self.device)

    def _split_state(self, point: Mapping[str, Tensor] | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        named = dict(self.model.named_parameters())
        state = {n: p for n, p in named.items()}
        if point:
            for name, value in point.items():
                if name not in named:
                    raise UnknownNameError(f"Unknown parameter in point '{name}'. Available: "
                                           f"{', '.join(list(named)[:12])}{', ...' if len(named) > 12 else ''}")
                if tuple(value.shape) != tuple(named[name].shape):
                    raise BaseMismatchError(f"point['{name}'] has shape {tuple(value.shape)}, "
                                            f"the model's parameter has {tuple(named[name].shape)}.")
                state[name] = value
        state.update({n: b for n, b in self.model.named_buffers()})
        chosen = set(self.param_names)
        theta = {n: self._cast(state[n]) for n in self.param_names}
        frozen = {n: self._cast(t) for n, t in state.items() if n not in chosen}
        return theta, frozen

    # -- data -----------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = shard_batches(self.data) if (self.shard and self.data_parallel) else self.data
        for batch in batches:
            try:
                x, y = batch[0], batch[1]
            except (TypeError, IndexError, KeyError) as e:
                raise DataError(f"Each batch must be an (x, y) pair, got {type(batch).__name__}.") from e
            x = x.to(device=self.device, dtype=self.dtype) if x.is_floating_point() else x.to(self.device)
            y = torch.as_tensor(y, device=self.device)
            if y.ndim != 1 or y.is_floating_point():
                raise DataError(f"Labels must be a 1-d integer tensor, got shape {tuple(y.shape)} dtype {y.dtype}.")
            if y.numel() == 0:
                continue
            yield x, y.long()

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(curvature_mode())
        stack.enter_context(_eval_mode(self.model))
        return stack

    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]], index: int | None = None) -> Tensor:
        """``(D, len(vs))`` products of the sum-loss curvature on batch number ``index`` (subclasses)."""
        raise NotImplementedError

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        # one pass over the data for the whole block
        if V.shape[1] == 0:
            return V.clone()
        vs = [self.unflatten(V[:, j].contiguous()) for j in range(V.shape[1])]
        return self._reduce(lambda x, y, i: self._block(x, y, vs, i), V, indexed=True)

    def _reduce(self, per_batch: Callable[..., Tensor], like: Tensor, indexed: bool = False) -> Tensor:
        """``(sum over batches of per_batch(x, y)) / N``, all-reduced across ranks.

        With ``indexed``, ``per_batch(x, y, i)`` also gets the batch's position ``i`` in
        this rank's pass over the data (the key of a cached first-order graph).
        """
        total = torch.zeros_like(like)
        n = 0
        with self._context():
            for i, (x, y) in enumerate(self._batches()):
                total = total + (per_batch(x, y, i) if indexed else per_batch(x, y))
                n += y.shape[0]
        if self.data_parallel:
            total = all_reduce_sum(total)
            n = int(all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=self.device)).item())
        if n == 0:
            raise DataError("The dataset is empty (no samples).")
        self.num_samples = n
        return total / n

    # -- functional model -----------------------------------------------------
    def _logits(self, theta: Mapping[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(self.model, {**self._frozen, **theta}, (x,))
        if not isinstance(out, Tensor) or out.ndim != 2:
            got = type(out).__name__ if not isinstance(out, Tensor) else f"shape {tuple(out.shape)}"
            raise TvdiagError(f"The model must return logits of shape (B, C); got {got}.")
        return out

    def _per_sample_losses(self, theta: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = self._logits(theta, x)
        C = logits.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= C:
            raise DataError(f"Labels out of range [0, {C}): min {int(y.min())}, max {int(y.max())}.")
        return F.cross_entropy(logits, y, reduction="none")

    def _loss_sum(self, theta: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self._per_sample_losses(theta, x, y).sum()

    def _shifted(self, delta: Tensor | None) -> dict[str, Tensor]:
        if delta is None:
            return self._theta
        d = self.unflatten(delta.detach().to(dtype=self.dtype, device=self.device))
        return {n: self._theta[n] + d[n] for n in self.param_names}

    def loss(self, delta: Tensor | None = None) -> float:
        """Mean loss ``L(theta + delta)`` over the data (float64 accumulation)."""
        theta = self._shifted(delta)
        like = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            return float(self._reduce(lambda x, y: self._loss_sum(theta, x, y).double(), like))

    def loss_change(self, delta: Tensor) -> LossChange:
        """``L(theta + delta) − L(theta)`` with its paired standard error over the images.

        Each image's loss is taken at both points (one pass over the data), so the se is that of the
        mean per-image difference, sd/√N; the two alternate-image halves (even and odd positions
        in each batch) give two independent measurements of the same change (their agreement is
        the measurement's own test–retest).
        """
        shifted = self._shifted(delta)
        like = torch.zeros(5, dtype=torch.float64, device=self.device)

        def sums(x: Tensor, y: Tensor) -> Tensor:
            d = (self._per_sample_losses(shifted, x, y) - self._per_sample_losses(self._theta, x, y)).double()
            even = torch.arange(d.shape[0], device=d.device) % 2 == 0
            return torch.stack([d.sum(), (d * d).sum(), d[even].sum(), even.sum().double(), d[~even].sum()])

        with torch.no_grad():
            m = self._reduce(sums, like)
        return LossChange.from_moments(m, self.num_samples)

    def directional_derivative(self, v: Tensor) -> tuple[float, float]:
        """``gᵀv`` (g the mean gradient) and its standard error over the images, from each image's
        ``g_iᵀv`` (one forward-mode product per batch)."""
        vd = self.unflatten(v.detach().to(dtype=self.dtype, device=self.device))
        like = torch.zeros(2, dtype=torch.float64, device=self.device)

        def sums(x: Tensor, y: Tensor) -> Tensor:
            gv = torch.func.jvp(lambda th: self._per_sample_losses(th, x, y), (self._theta,), (vd,))[1].double()
            return torch.stack([gv.sum(), (gv * gv).sum()])

        m = self._reduce(sums, like)
        return _mean_and_se(float(m[0]), float(m[1]), self.num_samples)

    def logit_taylor(self, v: Tensor) -> LogitTaylor:
        """Each image's logits z, their derivative a = Jv and second derivative b = vᵀ∇²z v along ``v``
        (one nested forward-mode product per batch, layer norms in differentiable primitives): the
        logit-space loss model of :mod:`~diag.curvature.operators.logit_taylor`."""
        vd = self.unflatten(v.detach().to(dtype=self.dtype, device=self.device))
        parts, n = [], 0
        with self._context(), composite_layer_norm():
            for x, y in self._batches():
                def along(th: dict[str, Tensor], x: Tensor = x) -> tuple[Tensor, Tensor]:
                    return torch.func.jvp(lambda t: self._logits(t, x), (th,), (vd,))

                (z, a), (_, b) = torch.func.jvp(along, (self._theta,), (vd,))
                even = torch.arange(y.shape[0], device=y.device) % 2 == 0
                parts.append([t.detach().double().cpu() for t in (z, a, b)] + [y.cpu(), even.cpu()])
                n += y.shape[0]
        if n == 0:
            raise DataError("The dataset is empty (no samples).")
        z, a, b, y, even = (torch.cat(c) for c in zip(*parts))
        return LogitTaylor(z, a, b, y, even, data_parallel=self.data_parallel)

    def gradient(self, delta: Tensor | None = None) -> Tensor:
        """Flat mean gradient ``grad L(theta + delta)`` of the selected parameters.

        At the point itself (``delta`` None) it is computed once per operator (a copy is returned),
        so the cards built on one operator (K-FAC and eigenpair) share one pass over the data.
        """
        if delta is None and self._gradient_at_point is not None:
            return self._gradient_at_point.clone()
        theta = self._shifted(delta)
        grad_fn = torch.func.grad(self._loss_sum)
        like = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        g = self._reduce(lambda x, y: self.flatten(grad_fn(theta, x, y)), like)
        if delta is None:
            self._gradient_at_point = g.clone()
        return g

    def _first_batch(self) -> tuple[Tensor, Tensor] | None:
        for b in self._batches():
            return b
        return None




def finite_difference_check(op: _ModelOperator, v: Tensor, eps: float = 1e-4) -> float:
    """Relative error of ``op @ v`` against central differences of the gradient.

    ``fd = (grad L(theta + h u) - grad L(theta - h u)) / (2 h) * |v|`` with
    ``u = v / |v|`` and step ``h = eps``; returns ``|fd - H v| / |H v|`` (the error
    of the difference quotient itself is ``O(eps^2)`` plus rounding ``O(machine_eps / eps)``).

    Args:
        op: A :class:`HessianOperator` (any operator with ``gradient(delta)``).
        v: Direction, ``(D,)``.
        eps: Step length along ``v / |v|``.
    """
    if not hasattr(op, "gradient"):
        raise TvdiagError(f"{type(op).__name__} has no gradient(); finite differences need a model operator.")
    v = v.detach().to(dtype=op.dtype, device=op.device).reshape(-1)
    norm = float(v.double().norm())
    if norm == 0:
        raise ValueError("finite_difference_check needs a non-zero direction.")
    u = v / norm
    fd = (op.gradient(eps * u).double() - op.gradient(-eps * u).double()) / (2 * eps) * norm
    hv = (op @ v).double()
    denom = float(hv.norm())
    return float((fd - hv).norm()) / (denom if denom > 0 else 1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
