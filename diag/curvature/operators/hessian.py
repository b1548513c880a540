"""Hessian operator of the mean cross-entropy, with two HVP engines and first-order graph reuse.

``H v = (1/N) sum_b d/dt grad(sum_{i in b} CE_i)(theta + t v)``. The double-backward
engine builds, per batch, the first-order graph (forward and ``grad`` with
``create_graph=True``) once and differentiates ``grad . v`` through it for every
vector of a block; with ``keep_graphs > 0`` and a list of batches it keeps the graphs
of the first ``keep_graphs`` batches alive between products, so successive products
(a Lanczos run, a Hutchinson run in blocks) pay only the second backward — what
PyHessian does with its retained ``gradsH``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diag.curvature.operators.model import _ModelOperator
from train.errors import unknown

__all__ = ["DEFAULT_KEEP_GRAPHS", "ENGINES", "HessianOperator"]

log = logging.getLogger(__name__)

ENGINES = ("fwd-rev", "double-backward")
DEFAULT_KEEP_GRAPHS = 1
"""Batches whose first-order graph a :class:`HessianOperator` keeps between products.

One kept graph adds no peak memory (a product from scratch holds that graph at its peak
anyway); every further one holds another batch's activations for the operator's life."""

_CHOSEN: dict[tuple, tuple[str, dict[str, float], dict[str, str]]] = {}
"""``engine="auto"``'s choices in this process, by :meth:`HessianOperator._choice_key`: an operator of the
same model shapes, batch, dtype, device and thread count reuses the first one's choice (and its timings)
instead of timing both engines again (about 3 s per tiny-ViT operator on one CPU thread)."""


class _FirstOrder(NamedTuple):
    """A first-order graph: leaf parameters, the gradients that depend on them, their positions,
    and every parameter's gradient (``None`` where unused)."""

    leaves: list[Tensor]
    grads: list[Tensor]
    keep: list[int]
    values: tuple[Tensor | None, ...]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HessianOperator(_ModelOperator):
    """Hessian ``H = d^2 L / d theta^2`` of the mean cross-entropy over a dataset.

    ``H v`` is a sum over batches of ``d/dt grad(sum_b CE)(theta + t v)`` divided by
    the total sample count ``N``.

    Args:
        model, data, params, loss, point, dtype, shard, data_parallel: see
            :class:`~diag.curvature.operators.model._ModelOperator`.
        engine: ``"fwd-rev"`` (``torch.func.jvp`` of ``torch.func.grad``),
            ``"double-backward"`` (``autograd.grad`` twice), or ``"auto"``: time both
            on the first batch and keep the faster (``engine_timings`` holds the
            seconds per product, ``engine_errors`` any engine that failed).
        keep_graphs: Double-backward engine only: when ``data`` is a list or tuple,
            keep the first-order graphs of its first ``keep_graphs`` batches between
            products (memory: one retained forward/backward graph per batch); 0 rebuilds
            the graph for every block. A block of ``k`` vectors always shares one graph.
        batch_tangents: Double-backward engine only: differentiate ``grad . v`` for all
            ``k`` vectors of a block in one batched second backward
            (``autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the
            tangents) instead of ``k`` second backwards on the retained graph. Same
            numbers (a test checks it in float64); ``k``-fold memory of one second
            backward. Default off: on one CPU thread it is slower (a block of 8 on the
            tiny model, 64 images: 1.37x the CPU time of 8 one-by-one products, median
            of 5 back-to-back rounds; the second backward is matmul-bound, so batching
            saves no flops); on a GPU it is unmeasured yet — ``diag bench curvature``
            reports both (``block8_*per_probe_s``, ``block8_batched_over_loop``).

    Attributes:
        engine: The engine in use.
        engine_timings: ``{engine: seconds per HVP on the first batch}`` (auto only;
            for double-backward with kept graphs, the cost of a product on a kept graph).

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
                 data_parallel: bool | None = None, keep_graphs: int = DEFAULT_KEEP_GRAPHS,
                 batch_tangents: bool = False) -> None:
        super().__init__(model, data, params=params, loss=loss, point=point, dtype=dtype, shard=shard,
                         data_parallel=data_parallel)
        if engine not in ENGINES + ("auto",):
            raise unknown("engine", str(engine), ENGINES + ("auto",))
        if int(keep_graphs) < 0:
            raise ValueError(f"keep_graphs={keep_graphs}; must be >= 0")
        self.keep_graphs = int(keep_graphs)
        self.batch_tangents = bool(batch_tangents)
        self._graphs: dict[int, _FirstOrder] = {}
        self.engine_timings: dict[str, float] = {}
        self.engine_errors: dict[str, str] = {}
        self.engine_reused = False  # auto: the engine an earlier operator of this process chose (_CHOSEN)
        self.engine = self._choose_engine() if engine == "auto" else engine

    # -- first-order graphs ---------------------------------------------------------
    @property
    def reuses_graphs(self) -> bool:
        """True when products on this operator reuse kept first-order graphs."""
        return self.engine_keeps_graphs and self.keep_graphs > 0 and isinstance(self.data, (list, tuple))

    @property
    def engine_keeps_graphs(self) -> bool:
        return getattr(self, "engine", "double-backward") == "double-backward"

    def clear_graphs(self) -> None:
        """Free the kept first-order graphs (the next product rebuilds them)."""
        self._graphs.clear()

    def _first_order(self, x: Tensor, y: Tensor, index: int | None) -> tuple[_FirstOrder, bool]:
        """The first-order graph of batch ``index`` (kept or new) and whether it is kept."""
        keep_it = index is not None and self.reuses_graphs and index < self.keep_graphs
        if keep_it and index in self._graphs:
            return self._graphs[index], True
        names = self.param_names
        with torch.enable_grad():
            leaves = [self._theta[n].detach().requires_grad_(True) for n in names]
            loss = self._loss_sum(dict(zip(names, leaves)), x, y)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        fo = _FirstOrder(leaves, [grads[i] for i in keep], keep, grads)
        if keep_it:
            self._graphs[index] = fo
        return fo, keep_it

    def mean_gradient(self) -> Tensor:
        """Flat mean gradient ``∇L(θ) = (1/N) Σ_b ∇ Σ_{i∈b} CE_i``, read off the first-order graphs.

        With kept graphs (double backward) this costs no pass of its own when products
        follow: the graphs it builds are kept for them (batches past ``keep_graphs`` pay
        one gradient each). Otherwise it is :meth:`gradient`.
        """
        if not self.reuses_graphs:
            return self.gradient()
        like = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        return self._reduce(lambda x, y, i: self._flat(self._first_order(x, y, i)[0].values), like, indexed=True)

    # -- engines --------------------------------------------------------------------
    def _flat(self, parts: Sequence[Tensor | None]) -> Tensor:
        return torch.cat([(torch.zeros_like(self._theta[n]) if h is None else h.detach()).reshape(-1)
                          for n, h in zip(self.param_names, parts)]).to(self.dtype)

    def _hvp_fwd_rev(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]]) -> Tensor:
        grad_fn = torch.func.grad(lambda th: self._loss_sum(th, x, y))
        return torch.stack([self.flatten(torch.func.jvp(grad_fn, (self._theta,), (v,))[1]) for v in vs], dim=1)

    def _hvp_double_backward(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]],
                             index: int | None = None) -> Tensor:
        """One first-order graph for the block; ``d(grad . v)/d theta`` per vector, or batched over the block."""
        fo, kept = self._first_order(x, y, index)
        if not fo.keep:  # the gradient does not depend on the parameters: H = 0
            return torch.zeros(self.shape[0], len(vs), dtype=self.dtype, device=self.device)
        names = self.param_names
        cols = []
        with torch.enable_grad():
            if self.batch_tangents and len(vs) > 1:
                outs = [torch.stack([v[names[i]] for v in vs]) for i in fo.keep]
                hv = torch.autograd.grad(fo.grads, fo.leaves, grad_outputs=outs, allow_unused=True,
                                         retain_graph=kept, is_grads_batched=True)
                return torch.stack([self._flat([None if h is None else h[j] for h in hv])
                                    for j in range(len(vs))], dim=1)
            for j, v in enumerate(vs):
                hv = torch.autograd.grad(fo.grads, fo.leaves, grad_outputs=[v[names[i]] for i in fo.keep],
                                         allow_unused=True, retain_graph=kept or j < len(vs) - 1)
                cols.append(self._flat(hv))
        return torch.stack(cols, dim=1)

    def _hvp_batch(self, engine: str, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]],
                   index: int | None = None) -> Tensor:
        """``(D, len(vs))`` block of sum-loss HVPs on one batch."""
        if engine == "fwd-rev":
            return self._hvp_fwd_rev(x, y, vs)
        return self._hvp_double_backward(x, y, vs, index)

    def _block(self, x: Tensor, y: Tensor, vs: list[dict[str, Tensor]], index: int | None = None) -> Tensor:
        return self._hvp_batch(self.engine, x, y, vs, index)

    def _time_engine(self, engine: str, x: Tensor, y: Tensor, v: list[dict[str, Tensor]]) -> float:
        """Best of two timed products after a warm-up (which also keeps batch 0's graph)."""
        self._hvp_batch(engine, x, y, v, 0)
        times = []
        for _ in range(2):
            _sync(self.device)
            t0 = time.perf_counter()
            self._hvp_batch(engine, x, y, v, 0)
            _sync(self.device)
            times.append(time.perf_counter() - t0)
        return min(times)

    def _choice_key(self, x: Tensor, y: Tensor) -> tuple:
        """What the engines' speed depends on: the model, its selected parameters, the batch, dtype,
        device, threads, loss and graph reuse (not the parameter values)."""
        return (type(self.model).__qualname__, tuple(self.param_names), tuple(self.param_shapes),
                tuple(x.shape), str(x.dtype), tuple(y.shape), str(self.dtype), str(self.device),
                torch.get_num_threads(), self.loss_name, self.keep_graphs > 0 and isinstance(self.data, (list, tuple)))

    def _choose_engine(self) -> str:
        """The faster engine on the first batch (timed once per :meth:`_choice_key` in this process)."""
        last_error: Exception | None = None
        self.engine = "double-backward"  # so that timing keeps graphs as the products will
        with self._context():
            first = self._first_batch()
            if first is None:
                return "fwd-rev"
            x, y = first
            key = self._choice_key(x, y)
            if key in _CHOSEN:
                best, timings, errors = _CHOSEN[key]
                self.engine_timings, self.engine_errors, self.engine_reused = dict(timings), dict(errors), True
                return best
            gen = torch.Generator(device="cpu").manual_seed(0)
            v = [self.unflatten(torch.randn(self.shape[0], generator=gen, dtype=torch.float64).to(self.dtype)
                                .to(self.device))]
            for engine in ENGINES:
                try:
                    self.engine_timings[engine] = self._time_engine(engine, x, y, v)
                except (RuntimeError, NotImplementedError) as e:  # an op without forward AD / double backward
                    self.engine_errors[engine] = f"{type(e).__name__}: {e}"
                    last_error = e
                    log.info("HVP engine %s failed on this model: %s", engine, e)
        if not self.engine_timings:  # the model itself fails: show its own error
            raise last_error
        best = min(self.engine_timings, key=self.engine_timings.get)
        if best != "double-backward":
            self.clear_graphs()
        log.info("HVP engine timings %s -> %s", self.engine_timings, best)
        _CHOSEN[key] = (best, dict(self.engine_timings), dict(self.engine_errors))
        return best

    # Forward-over-forward (nested torch.func.jvp) would give v^T H v without an HVP,
    # but torch 2.14's nested forward AD of layer_norm is wrong (pytorch#196700; on a
    # tiny open_clip ViT it is off by ~0.5 %), so quadratic forms use one HVP.
