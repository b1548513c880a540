"""External curvature backends behind our types: PyHessian 0.1 and curvlinops 3.

* :func:`pyhessian_trace_and_top_eig` runs PyHessian's Hutchinson trace and power
  iteration inside :func:`~diag.curvature.operators.attention.curvature_mode` (its double
  backward fails on fused attention kernels otherwise) on a parameter subset, on CPU
  or CUDA, and returns a :class:`~diag.curvature.results.BackendResult`. PyHessian's
  trace draws Rademacher probes from the global RNG and stops as soon as the running
  mean changes by less than ``tol`` relative (often after two probes); we report its
  probe count and a standard error computed from its per-probe values. Its power
  iteration stops on a relative eigenvalue change below ``tol``; we add explicit
  residuals ``‖H v − λ v‖``.
* :class:`CurvlinopsHessian` wraps ``curvlinops.HessianLinearOperator`` as an
  operator with ``shape``/``dtype``/``device``/``@`` whose products run in curvature
  mode and eval mode, so it can be fed to our estimators or compared with ours.

Both are optional dependencies; a missing one raises :class:`~train.errors.TvdiagError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from diag.curvature.operators.attention import curvature_mode
from diag.curvature.params import select_params
from diag.curvature.results import BackendResult, EigenResult, TraceEstimate
from train.errors import TvdiagError, unknown

__all__ = ["CurvlinopsHessian", "pyhessian_trace_and_top_eig"]

_LOSSES = ("ce",)


def _loss_module(loss: str) -> nn.Module:
    if loss not in _LOSSES:
        raise unknown("loss", str(loss), _LOSSES)
    return nn.CrossEntropyLoss(reduction="mean")


@contextlib.contextmanager
def _only_requires_grad(model: nn.Module, names: Sequence[str]) -> Iterator[list[nn.Parameter]]:
    """Temporarily set ``requires_grad`` to exactly the named parameters; clear ``.grad``."""
    chosen = set(names)
    saved = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
            p.grad = None
        yield [p for n, p in model.named_parameters() if n in chosen]
    finally:
        for n, p in model.named_parameters():
            req, grad = saved[n]
            p.grad = grad  # drops the create_graph gradients (and their graph)
            p.requires_grad_(req)


@contextlib.contextmanager
def _keep_training_flag(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


@contextlib.contextmanager
def _count_pyhessian_hvps(on_product: Callable[[list, list], None] | None = None) -> Iterator[list[int]]:
    """Count PyHessian's single-batch Hessian-vector products (and pass each ``(v, Hv)`` to ``on_product``).

    PyHessian does not report how many products its power iteration used; it calls
    the module-level ``pyhessian.hessian.hessian_vector_product``, which is wrapped
    with a counter for the duration of the block and restored afterwards.
    """
    import sys

    _import_pyhessian()
    ph = sys.modules["pyhessian.hessian"]  # the module; the package re-exports the class under this name
    original = ph.hessian_vector_product
    count = [0]

    def counted(gradsH, params, v):
        count[0] += 1
        Hv = original(gradsH, params, v)
        if on_product is not None:
            on_product(v, Hv)
        return Hv

    ph.hessian_vector_product = counted
    try:
        yield count
    finally:
        ph.hessian_vector_product = original


def _import_pyhessian():
    try:
        from pyhessian import hessian
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TvdiagError("The PyHessian backend needs `pip install pyhessian`.") from e
    return hessian


def _pyhessian_eigen_result(comp, plist: list[Tensor], eigvals, eigvecs, n_eig: int, max_iter: int) -> EigenResult:
    """PyHessian's eigenpairs as an :class:`EigenResult`, with residuals ``‖Hv − λv‖`` from one product each."""
    from pyhessian.utils import hessian_vector_product  # the uncounted original

    V = torch.stack([torch.cat([t.detach().reshape(-1) for t in vec]) for vec in eigvecs], dim=1)
    V = V / V.norm(dim=0, keepdim=True)
    lam = torch.tensor(eigvals, dtype=torch.float64)
    res = []
    for j in range(V.shape[1]):
        parts = [t.reshape(p.shape).to(p.dtype) for t, p in zip(torch.split(V[:, j], [p.numel() for p in plist]),
                                                                plist)]
        hv = torch.cat([h.reshape(-1) for h in hessian_vector_product(comp.gradsH, comp.params, parts)]).double()
        res.append(float((hv - lam[j] * V[:, j].double()).norm()))
    return EigenResult(lam, V.double(), torch.tensor(res, dtype=torch.float64), n_eig + V.shape[1],
                       "pyhessian-power", max_iter)


def pyhessian_trace_and_top_eig(model: nn.Module, x: Tensor, y: Tensor, params: str | Sequence[str] | None = None,
                                loss: str = "ce", top_n: int = 1, max_iter: int = 100, tol: float = 1e-3,
                                seed: int = 0, trace: bool = True, eigen: bool = True) -> BackendResult:
    """PyHessian's Hessian trace and top eigenvalues on one batch, as our typed result.

    ``H = ∇²_θ mean_i CE(f(θ, x_i), y_i)`` over the selected parameters, at the
    module's current parameters. PyHessian keeps the first-order graph of the batch
    and reuses it for every product.

    Args:
        model: Module mapping ``x`` to logits ``(B, C)`` (its parameters' device decides
            CPU or CUDA).
        x, y: The batch.
        params: ``None`` (all parameters with ``requires_grad``) or name globs.
        loss: ``"ce"``.
        top_n: Number of top eigenvalues (power iteration with deflation).
        max_iter: PyHessian's ``maxIter`` for trace and each eigenvalue.
        tol: PyHessian's relative stopping tolerance (default 1e-3 as in PyHessian).
        seed: Seeds the global RNG inside a forked RNG state (restored afterwards).
        trace, eigen: Which quantities to compute.

    Returns:
        :class:`BackendResult` with ``backend="pyhessian"``. The eigenvectors are flat
        ``(D, top_n)`` in ``named_parameters`` order of the selected parameters.
    """
    hessian = _import_pyhessian()
    criterion = _loss_module(loss)
    names = select_params(model, params)
    device = next(iter(model.parameters())).device
    cuda = device.type == "cuda"
    x, y = x.to(device), y.to(device)
    fork_devices = [device] if cuda else []
    with _keep_training_flag(model), _only_requires_grad(model, names) as plist, curvature_mode(), \
            torch.random.fork_rng(devices=fork_devices), _count_pyhessian_hvps() as count:
        torch.manual_seed(seed)
        comp = hessian(model, criterion, data=(x, y), cuda=cuda)
        t_est = e_res = None
        if trace:
            vals = torch.tensor(comp.trace(maxIter=max_iter, tol=tol), dtype=torch.float64)
            n = vals.shape[0]
            se = float(vals.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
            t_est = TraceEstimate(float(vals.mean()), se, n, "pyhessian", n, vals, seed,
                                  n < max_iter, tol)
        if eigen:
            n_before = count[0]
            eigvals, eigvecs = comp.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
            e_res = _pyhessian_eigen_result(comp, plist, eigvals, eigvecs, count[0] - n_before, max_iter)
        total = count[0] + (e_res.k if e_res is not None else 0)
        del comp
    return BackendResult("pyhessian", t_est, e_res, total,
                         f"relative change of the running mean < {tol} (max {max_iter} probes)")


class CurvlinopsHessian:
    """``curvlinops.HessianLinearOperator`` over a parameter subset, with our operator protocol.

    ``H = ∇²_θ (1/N) Σ_i CE(f(θ, x_i), y_i)`` over all batches of ``data``; products
    run forward-over-reverse (curvlinops' ``jvp`` of ``jacrev``, vmapped over columns)
    inside :func:`curvature_mode` with the model in eval mode.

    Args:
        model: Module mapping ``x`` to logits.
        data: Re-iterable of ``(x, y)`` batches.
        params: ``None`` or name globs (flat order = ``named_parameters`` order, as in
            our operators).
        loss: ``"ce"``.
        check_deterministic: Passed to curvlinops (it runs extra passes to check).

    Attributes:
        shape, dtype, device: As for our operators.
        op: The curvlinops operator.
    """

    def __init__(self, model: nn.Module, data: Iterable, params: str | Sequence[str] | None = None,
                 loss: str = "ce", check_deterministic: bool = False) -> None:
        try:
            from curvlinops import HessianLinearOperator
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TvdiagError("The curvlinops comparison needs `pip install curvlinops-for-pytorch`.") from e
        names = select_params(model, params)
        named = dict(model.named_parameters())
        plist = [named[n] for n in names]
        self.model = model
        self.param_names = tuple(names)
        D = sum(p.numel() for p in plist)
        self.shape = (D, D)
        self.dtype = plist[0].dtype
        self.device = plist[0].device
        with _keep_training_flag(model), curvature_mode():
            model.eval()
            self.op = HessianLinearOperator(model, _loss_module(loss), plist, data,
                                            check_deterministic=check_deterministic)

    def __matmul__(self, v: Tensor) -> Tensor:
        v = v.detach().to(dtype=self.dtype, device=self.device)
        with _keep_training_flag(self.model), curvature_mode():
            self.model.eval()
            return self.op @ v

    def __repr__(self) -> str:
        return f"CurvlinopsHessian(D={self.shape[0]}, dtype={self.dtype}, device={self.device})"
