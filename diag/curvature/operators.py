"""Curvature operators: Hessian, generalised Gauss-Newton and empirical Fisher.

Every operator is a symmetric ``D x D`` linear map over a flat parameter vector and
implements one product, :meth:`CurvatureOperator._matvec`; the base class provides
``op @ v`` for ``(D,)`` vectors and ``(D, k)`` blocks, :meth:`~CurvatureOperator.to_scipy`
and :meth:`~CurvatureOperator.to_dense`.

The model operators act on the classification loss over a dataset of ``(x, y)``
batches,

    L(theta) = (1/N) sum_i CE(f(theta, x_i), y_i),      N = total sample count,

so the operator of the whole dataset is the sample-count-weighted average of the
per-batch operators:

* Hessian:  H = (1/N) sum_i d^2 CE_i / d theta^2
* GGN:      G = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i,  J_i = d f(theta, x_i) / d theta,
  p_i = softmax(f(theta, x_i))
* Empirical Fisher: F = (1/N) sum_i g_i g_i^T,  g_i = d CE_i / d theta

Products run inside :func:`~diag.curvature.attention.curvature_mode` with the model
in eval mode (both restored afterwards); the module's parameters are never modified
(the operator evaluates at its own detached copy of the point, through
``torch.func.functional_call``). Under ``torch.distributed`` each rank sums over its
own batches and the products and sample counts are all-reduced, so every rank gets
the same product (the vector ``v`` must be the same on all ranks).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call

from diag.curvature.attention import curvature_mode
from diag.curvature.distributed import all_reduce_sum, is_distributed, shard_batches
from diag.curvature.params import ParamLayout, layout_for, select_params
from train.errors import BaseMismatchError, DataError, TvdiagError, UnknownNameError, unknown

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "exact_ggn_diagonal",
    "finite_difference_check",
    "MAX_DENSE_DIM",
    "ENGINES",
]

log = logging.getLogger(__name__)

MAX_DENSE_DIM = 20000
"""Largest D for which :meth:`CurvatureOperator.to_dense` builds the matrix."""

ENGINES = ("fwd-rev", "double-backward")
LOSSES = ("ce",)


class CurvatureOperator:
    """A symmetric linear operator ``A`` on flat ``(D,)`` vectors.

    Subclasses implement :meth:`_matvec` and set :attr:`shape`, :attr:`dtype` and
    :attr:`device` (by calling ``super().__init__``).

    Attributes:
        SELF_ADJOINT: ``A = A^T`` (true for every curvature matrix here).
        shape: ``(D, D)``.
        dtype: dtype of the products.
        device: device of the products.
    """

    SELF_ADJOINT = True

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape: tuple[int, int] = (int(dim), int(dim))
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)

    # -- the one product --------------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        """Return ``A v`` for a flat ``(D,)`` vector already on the operator's dtype/device."""
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        """Return ``A V`` for a ``(D, k)`` block (default: one :meth:`_matvec` per column)."""
        if V.shape[1] == 0:
            return V.clone()
        return torch.stack([self._matvec(V[:, j].contiguous()) for j in range(V.shape[1])], dim=1)

    # -- public interface -------------------------------------------------------
    def __matmul__(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(D,)`` or ``(D, k)``; returns the same shape.

        The result has the operator's dtype and device.
        """
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, Tensor):
            return NotImplemented
        if v.ndim not in (1, 2) or v.shape[0] != self.shape[1]:
            raise ValueError(f"Expected a ({self.shape[1]},) vector or ({self.shape[1]}, k) block, got {tuple(v.shape)}.")
        v = v.detach().to(dtype=self.dtype, device=self.device)
        with torch.no_grad():
            out = self._matvec(v) if v.ndim == 1 else self._matmat(v)
        return out.detach()

    def matvec(self, v: Tensor) -> Tensor:
        """Alias of ``self @ v``."""
        return self @ v

    def quadratic_form(self, v: Tensor) -> float:
        """``v^T A v`` with a float64 reduction (one product)."""
        v = v.detach().to(dtype=self.dtype, device=self.device).reshape(-1)
        return float(torch.dot(v.double(), (self @ v).double()))

    def to_scipy(self) -> LinearOperator:
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out)."""
        D = self.shape[0]

        def mv(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64)
            out = self @ torch.from_numpy(np.ascontiguousarray(x.reshape(D)))
            return out.detach().to("cpu", torch.float64).numpy().reshape(x.shape)

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            out = self @ torch.from_numpy(np.ascontiguousarray(X))
            return out.detach().to("cpu", torch.float64).numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    def to_dense(self, chunk: int = 64) -> Tensor:
        """The ``D x D`` matrix, from products with unit vectors (``chunk`` at a time).

        Raises:
            TvdiagError: if ``D > MAX_DENSE_DIM`` (20000).
        """
        D = self.shape[0]
        if D > MAX_DENSE_DIM:
            raise TvdiagError(f"to_dense() refuses D={D} > {MAX_DENSE_DIM}; use a parameter subset or an estimator.")
        cols = []
        for start in range(0, D, chunk):
            stop = min(D, start + chunk)
            E = torch.zeros(D, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self @ E)
        return torch.cat(cols, dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(D={self.shape[0]}, dtype={self.dtype}, device={self.device})"


class DenseOperator(CurvatureOperator):
    """An explicit symmetric matrix as a :class:`CurvatureOperator` (for tests and small problems).

    Args:
        matrix: ``(D, D)`` symmetric tensor.
        atol: Symmetry tolerance, relative to ``max |matrix|``.

    Raises:
        ValueError: if ``matrix`` is not square or not symmetric.
    """

    def __init__(self, matrix: Tensor, atol: float = 1e-8) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got {tuple(matrix.shape)}.")
        scale = float(matrix.abs().max()) if matrix.numel() else 0.0
        if matrix.numel() and float((matrix - matrix.T).abs().max()) > atol * max(scale, 1.0):
            raise ValueError("DenseOperator needs a symmetric matrix.")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix.detach()

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def to_dense(self, chunk: int = 64) -> Tensor:
        return self.matrix.clone()


# --------------------------------------------------------------------------------------
# model operators
# --------------------------------------------------------------------------------------


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

    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> Tensor:
        """``(D, len(vs))`` products of the sum-loss curvature on one batch (subclasses)."""
        raise NotImplementedError

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        # one pass over the data for the whole block
        if V.shape[1] == 0:
            return V.clone()
        vs = [self.unflatten(V[:, j].contiguous()) for j in range(V.shape[1])]
        return self._reduce(lambda x, y: self._block(x, y, vs), V)

    def _reduce(self, per_batch: Callable[[Tensor, Tensor], Tensor], like: Tensor) -> Tensor:
        """``(sum over batches of per_batch(x, y)) / N``, all-reduced across ranks."""
        total = torch.zeros_like(like)
        n = 0
        with self._context():
            for x, y in self._batches():
                total = total + per_batch(x, y)
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

    def _loss_sum(self, theta: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = self._logits(theta, x)
        C = logits.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= C:
            raise DataError(f"Labels out of range [0, {C}): min {int(y.min())}, max {int(y.max())}.")
        return F.cross_entropy(logits, y, reduction="sum")

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

    def gradient(self, delta: Tensor | None = None) -> Tensor:
        """Flat mean gradient ``grad L(theta + delta)`` of the selected parameters."""
        theta = self._shifted(delta)
        grad_fn = torch.func.grad(self._loss_sum)
        like = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        return self._reduce(lambda x, y: self.flatten(grad_fn(theta, x, y)), like)

    def _first_batch(self) -> tuple[Tensor, Tensor] | None:
        for b in self._batches():
            return b
        return None


class HessianOperator(_ModelOperator):
    """Hessian ``H = d^2 L / d theta^2`` of the mean cross-entropy over a dataset.

    ``H v`` is a sum over batches of ``d/dt grad(sum_b CE)(theta + t v)`` divided by
    the total sample count ``N``.

    Args:
        model, data, params, loss, point, dtype, shard: see the module docstring and
            :class:`_ModelOperator`.
        engine: ``"fwd-rev"`` (``torch.func.jvp`` of ``torch.func.grad``),
            ``"double-backward"`` (``autograd.grad`` twice), or ``"auto"``: time both
            on the first batch and keep the faster (``engine_timings`` holds the
            seconds per product, ``engine_errors`` any engine that failed).

    Attributes:
        engine: The engine in use.
        engine_timings: ``{engine: seconds per HVP on the first batch}`` (auto only).

    Example (closed form: for a linear model, ``H`` = (1/N) sum_i x_i x_i^T kron (diag(p_i) - p_i p_i^T)):
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2, bias=False).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64); y = torch.tensor([0, 1, 1, 0, 1])
        >>> op = HessianOperator(model, [(x, y)], engine="double-backward")
        >>> p = torch.softmax(model(x), -1).detach()
        >>> H = sum(torch.kron(torch.diag(pi) - torch.outer(pi, pi), torch.outer(xi, xi)) for pi, xi in zip(p, x)) / 5
        >>> bool(torch.allclose(op.to_dense(), H))
        True
    """

    def __init__(self, model: nn.Module, data: Iterable, params: str | Sequence[str] | None = None,
                 loss: str = "ce", engine: str = "auto", point: Mapping[str, Tensor] | None = None,
                 dtype: torch.dtype | None = None, shard: bool = False,
                 data_parallel: bool | None = None) -> None:
        super().__init__(model, data, params=params, loss=loss, point=point, dtype=dtype, shard=shard,
                         data_parallel=data_parallel)
        if engine not in ENGINES + ("auto",):
            raise unknown("engine", str(engine), ENGINES + ("auto",))
        self.engine_timings: dict[str, float] = {}
        self.engine_errors: dict[str, str] = {}
        self.engine = self._choose_engine() if engine == "auto" else engine

    # -- engines --------------------------------------------------------------
    def _hvp_fwd_rev(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        grad_fn = torch.func.grad(lambda th: self._loss_sum(th, x, y))
        return [torch.func.jvp(grad_fn, (self._theta,), (v,))[1] for v in vs]

    def _hvp_double_backward(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        # one forward and first backward per batch, then one second backward per vector
        names = self.param_names
        outs = [{n: torch.zeros_like(self._theta[n]) for n in names} for _ in vs]
        with torch.enable_grad():
            th = {n: self._theta[n].detach().requires_grad_(True) for n in names}
            loss = self._loss_sum(th, x, y)
            grads = torch.autograd.grad(loss, [th[n] for n in names], create_graph=True, allow_unused=True)
            keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not keep:  # the gradient does not depend on the parameters: H = 0
                return outs
            for j, v in enumerate(vs):
                hv = torch.autograd.grad([grads[i] for i in keep], [th[n] for n in names],
                                         grad_outputs=[v[names[i]] for i in keep], allow_unused=True,
                                         retain_graph=j < len(vs) - 1)
                for n, h in zip(names, hv):
                    if h is not None:
                        outs[j][n] = h.detach()
        return outs

    def _hvp_batch(self, engine: str, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> Tensor:
        """``(D, len(vs))`` block of sum-loss HVPs on one batch."""
        fn = self._hvp_fwd_rev if engine == "fwd-rev" else self._hvp_double_backward
        return torch.stack([self.flatten(h) for h in fn(x, y, vs)], dim=1)

    def _choose_engine(self) -> str:
        last_error: Exception | None = None
        with self._context():
            first = self._first_batch()
            if first is None:
                return "fwd-rev"
            x, y = first
            gen = torch.Generator(device="cpu").manual_seed(0)
            v = [self.unflatten(torch.randn(self.shape[0], generator=gen, dtype=torch.float64).to(self.dtype)
                                .to(self.device))]
            for engine in ENGINES:
                try:
                    self._hvp_batch(engine, x, y, v)  # warm-up
                    times = []
                    for _ in range(2):
                        _sync(self.device)
                        t0 = time.perf_counter()
                        self._hvp_batch(engine, x, y, v)
                        _sync(self.device)
                        times.append(time.perf_counter() - t0)
                    self.engine_timings[engine] = min(times)
                except (RuntimeError, NotImplementedError) as e:  # an op without forward AD / double backward
                    self.engine_errors[engine] = f"{type(e).__name__}: {e}"
                    last_error = e
                    log.info("HVP engine %s failed on this model: %s", engine, e)
        if not self.engine_timings:  # the model itself fails: show its own error
            raise last_error
        best = min(self.engine_timings, key=self.engine_timings.get)
        log.info("HVP engine timings %s -> %s", self.engine_timings, best)
        return best

    # -- products -------------------------------------------------------------
    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> Tensor:
        # double backward reuses one graph for the whole block
        return self._hvp_batch(self.engine, x, y, vs)

    # Forward-over-forward (nested torch.func.jvp) would give v^T H v without an HVP,
    # but torch 2.14's nested forward AD of layer_norm is wrong (pytorch#196700; on a
    # tiny open_clip ViT it is off by ~0.5 %), so quadratic forms use one HVP.


class GGNOperator(_ModelOperator):
    """Generalised Gauss-Newton ``G = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` for cross-entropy.

    One product per batch: ``J v`` by ``torch.func.jvp``, the output Hessian of CE
    (``diag(p) - p p^T`` per sample, independent of the label), then ``J^T (.)`` by
    ``torch.func.vjp``. ``G`` is positive semi-definite.
    """

    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> Tensor:
        f = lambda th: self._logits(th, x)  # noqa: E731
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


class EmpiricalFisherOperator(_ModelOperator):
    """Empirical Fisher ``F = (1/N) sum_i g_i g_i^T`` with per-sample gradients ``g_i = grad CE_i``.

    ``F v = (1/N) J_l^T (J_l v)`` where ``J_l`` is the Jacobian of the per-sample loss
    vector: one ``jvp`` gives all ``g_i . v`` and one ``vjp`` sums ``g_i (g_i . v)``,
    so no ``B x D`` per-sample gradient matrix is formed. :meth:`diagonal` does form
    per-sample gradients (``vmap`` of ``grad``).
    """

    def _per_sample_losses(self, th: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = self._logits(th, x)
        C = logits.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= C:
            raise DataError(f"Labels out of range [0, {C}): min {int(y.min())}, max {int(y.max())}.")
        return F.cross_entropy(logits, y, reduction="none")

    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> Tensor:
        f = lambda th: self._per_sample_losses(th, x, y)  # noqa: E731
        _, vjp_fn = torch.func.vjp(f, self._theta)
        cols = []
        for v in vs:
            gv = torch.func.jvp(f, (self._theta,), (v,))[1]
            cols.append(self.flatten(vjp_fn(gv)[0]))
        return torch.stack(cols, dim=1)


    def per_sample_gradients(self, x: Tensor, y: Tensor, chunk_size: int | None = None) -> Tensor:
        """``(B, D)`` per-sample gradients ``g_i`` on one batch (``vmap`` of ``grad``)."""

        def one(th: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return F.cross_entropy(self._logits(th, xi.unsqueeze(0)), yi.unsqueeze(0))

        with self._context():
            x = x.to(device=self.device, dtype=self.dtype) if x.is_floating_point() else x.to(self.device)
            g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(
                self._theta, x, y.to(self.device).long())
        return torch.cat([g[n].reshape(x.shape[0], -1) for n in self.param_names], dim=1).detach()

    def diagonal(self, chunk_size: int | None = None) -> Tensor:
        """Exact ``diag(F) = (1/N) sum_i g_i^2``."""

        def one(th: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return F.cross_entropy(self._logits(th, xi.unsqueeze(0)), yi.unsqueeze(0))

        psg = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)
        like = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        return self._reduce(
            lambda x, y: torch.cat([g.pow(2).sum(0).reshape(-1) for g in
                                    (psg(self._theta, x, y)[n] for n in self.param_names)]), like)


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
