"""Typed results of the curvature estimators.

Every stochastic estimate carries its standard error; derived quantities are methods
(``ci95()``, ``rel_stderr``); ``to_dict()`` gives a flat, JSON-friendly row (scalars
only, arrays on request) for pandas or ``--json``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BackendResult",
    "DataVarianceTrace",
    "DiagonalEstimate",
    "EigenResult",
    "SpectralDensity",
    "TraceEstimate",
    "t_quantile",
]


@functools.lru_cache(maxsize=256)
def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile ``t_{(1+level)/2, dof}`` (normal for ``dof <= 0`` or huge)."""
    from scipy import stats

    q = (1.0 + level) / 2.0
    if dof <= 0 or dof > 10_000:
        return float(stats.norm.ppf(q))
    return float(stats.t.ppf(q, dof))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _array(t: Tensor | None) -> list | None:
    return None if t is None else t.detach().cpu().tolist()


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate ``tr(A) ≈ value ± stderr``.

    Attributes:
        value: The estimate (float64 reduction).
        stderr: Its standard error. Hutchinson: ``s / sqrt(n)`` with ``s`` the sample
            standard deviation of the per-probe values ``vᵢᵀ A vᵢ``. Exact methods: 0.
        n_matvecs: Products with ``A`` spent.
        method: ``"hutchinson"``, ``"hutch++"``, ``"exact"``, ``"pyhessian"``, ...
        n_probes: Number of independent probe values behind ``stderr`` (the degrees of
            freedom of the CI are ``n_probes - 1``).
        probe_values: The per-probe values (float64, probe order) where available.
        seed: Seed of the probe stream (``None`` if not seeded by us).
        converged: Whether the requested relative standard error was reached
            (``None`` when no target was given).
        target_rel_stderr: The requested relative standard error, if any.
    """

    value: float
    stderr: float
    n_matvecs: int
    method: str = "hutchinson"
    n_probes: int = 0
    probe_values: Tensor | None = field(default=None, repr=False)
    seed: int | None = None
    converged: bool | None = None
    target_rel_stderr: float | None = None

    @property
    def rel_stderr(self) -> float:
        """``stderr / |value|`` (inf when the value is 0)."""
        return self.stderr / abs(self.value) if self.value != 0 else math.inf

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """Student-t confidence interval ``value ± t_{n-1} · stderr``."""
        h = t_quantile(level, self.n_probes - 1) * self.stderr
        return (self.value - h, self.value + h)

    def ci95(self) -> tuple[float, float]:
        """95 % confidence interval (see :meth:`ci`)."""
        return self.ci(0.95)

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        """Flat row; ``arrays=True`` adds ``probe_values`` as a list."""
        lo, hi = self.ci95()
        d = {"method": self.method, "value": self.value, "stderr": self.stderr, "rel_stderr": self.rel_stderr,
             "ci95_low": lo, "ci95_high": hi, "n_matvecs": self.n_matvecs, "n_probes": self.n_probes,
             "probe_seed": self.seed, "converged": self.converged, "target_rel_stderr": self.target_rel_stderr}
        if arrays:
            d["probe_values"] = _array(self.probe_values)
        return d

    def __repr__(self) -> str:
        return (f"TraceEstimate({self.method}: {_fmt(self.value)} ± {_fmt(self.stderr)}, "
                f"n_matvecs={self.n_matvecs}, n_probes={self.n_probes})")


@dataclass(frozen=True)
class DiagonalEstimate:
    """An estimate of ``diag(A)`` with per-entry standard errors.

    Attributes:
        mean: ``(D,)`` float64 estimate of the diagonal. Hutchinson:
            ``mean_i = (1/n) Σ_k v_k,i (A v_k)_i``.
        stderr: ``(D,)`` per-entry standard errors ``s_i / sqrt(n)`` (zeros if exact).
        n_matvecs: Products with ``A`` spent.
        total: ``Σ_i mean_i`` (= the trace estimate from the same probes).
        total_stderr: Standard error of ``total``, from the per-probe totals
            ``v_kᵀ A v_k`` (not ``sqrt(Σ stderr_i²)``, the entries are correlated).
        method: ``"hutchinson"`` or ``"exact"``.
        n_probes: Number of probes (0 for exact).
        seed, converged, target_rel_stderr: As in :class:`TraceEstimate`.
        probe_diagonals: ``(n, D)`` per-probe diagonals ``v_k ⊙ A v_k`` when the run
            kept them (``keep_probes=True``, opt-in: ``n · D`` numbers), else None; ``mean``
            is their column mean.
        probe_functionals: ``(n, m)`` per-probe scalars ``(v_k ⊙ A v_k)ᵀ w_j`` of the
            functionals ``w_j`` the run was given (``functionals=``), else None; column
            ``j``'s mean is ``meanᵀ w_j`` and its ``sd/√n`` that functional's standard error.
    """

    mean: Tensor = field(repr=False)
    stderr: Tensor = field(repr=False)
    n_matvecs: int
    total: float
    total_stderr: float
    method: str = "hutchinson"
    n_probes: int = 0
    seed: int | None = None
    converged: bool | None = None
    target_rel_stderr: float | None = None
    probe_diagonals: Tensor | None = field(default=None, repr=False)
    probe_functionals: Tensor | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        """D, the number of diagonal entries."""
        return int(self.mean.shape[0])

    @property
    def rel_stderr(self) -> float:
        """``total_stderr / |total|``."""
        return self.total_stderr / abs(self.total) if self.total != 0 else math.inf

    def ci(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Per-entry Student-t intervals ``mean ± t_{n-1} · stderr`` as two ``(D,)`` tensors."""
        h = t_quantile(level, self.n_probes - 1) * self.stderr
        return self.mean - h, self.mean + h

    def total_ci(self, level: float = 0.95) -> tuple[float, float]:
        """Confidence interval of the total (the trace)."""
        h = t_quantile(level, self.n_probes - 1) * self.total_stderr
        return (self.total - h, self.total + h)

    def ci95(self) -> tuple[float, float]:
        """95 % confidence interval of the total."""
        return self.total_ci(0.95)

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        """Flat row with summaries; ``arrays=True`` adds ``mean`` and ``stderr`` lists."""
        lo, hi = self.ci95()
        med_rel = float("nan")
        if self.dim:
            nz = self.mean != 0
            if bool(nz.any()):
                med_rel = float((self.stderr[nz] / self.mean[nz].abs()).median())
        d = {"method": self.method, "dim": self.dim, "total": self.total, "total_stderr": self.total_stderr,
             "rel_stderr": self.rel_stderr, "ci95_low": lo, "ci95_high": hi,
             "median_entry_rel_stderr": med_rel, "n_matvecs": self.n_matvecs, "n_probes": self.n_probes,
             "probe_seed": self.seed, "converged": self.converged, "target_rel_stderr": self.target_rel_stderr}
        if arrays:
            d["mean"] = _array(self.mean)
            d["stderr"] = _array(self.stderr)
        return d

    def __repr__(self) -> str:
        return (f"DiagonalEstimate({self.method}: D={self.dim}, total={_fmt(self.total)} ± "
                f"{_fmt(self.total_stderr)}, n_matvecs={self.n_matvecs})")


@dataclass(frozen=True)
class EigenResult:
    """Approximate eigenpairs ``A v_i ≈ λ_i v_i``.

    Attributes:
        eigvals: ``(k,)`` float64, in descending order (by value, or by magnitude for
            ``which="LM"``).
        eigvecs: ``(D, k)`` float64, orthonormal columns.
        residuals: ``(k,)`` explicit residual norms ``‖A v_i − λ_i v_i‖₂`` (computed with
            real products, not the Lanczos bound). ``λ_i`` lies within ``residuals_i``
            of an eigenvalue of ``A``.
        n_matvecs: Products with ``A`` spent (Lanczos: the residuals reuse its products;
            PyHessian: plus one per residual).
        method: ``"lanczos"``, ``"pyhessian-power"``, ...
        n_iters: Krylov dimension / iterations used.
    """

    eigvals: Tensor
    eigvecs: Tensor = field(repr=False)
    residuals: Tensor
    n_matvecs: int
    method: str = "lanczos"
    n_iters: int = 0

    @property
    def k(self) -> int:
        """Number of eigenpairs."""
        return int(self.eigvals.shape[0])

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        """Row with eigenvalues and residuals as lists; ``arrays=True`` adds eigenvectors."""
        d = {"method": self.method, "k": self.k, "eigvals": _array(self.eigvals),
             "residuals": _array(self.residuals), "n_matvecs": self.n_matvecs, "n_iters": self.n_iters}
        if arrays:
            d["eigvecs"] = _array(self.eigvecs)
        return d

    def __repr__(self) -> str:
        vals = ", ".join(_fmt(v) for v in self.eigvals.tolist())
        res = max(self.residuals.tolist()) if self.k else float("nan")
        return f"EigenResult({self.method}: eigvals=[{vals}], max_residual={_fmt(res)}, n_matvecs={self.n_matvecs})"


@dataclass(frozen=True)
class SpectralDensity:
    """Gaussian-smoothed spectral density from stochastic Lanczos quadrature.

    ``density(x) = (1/P) Σ_p Σ_j w_pj N(x; θ_pj, σ²)`` with Ritz values ``θ_pj`` and
    weights ``w_pj = (e₁ᵀ s_j)²`` of probe ``p``; ``∫ density ≈ 1`` and
    ``D · (1/P) Σ_p Σ_j w_pj θ_pj`` estimates ``tr(A)``.

    Attributes:
        grid: ``(G,)`` evaluation points.
        density: ``(G,)`` mean density over probes.
        stderr: ``(G,)`` pointwise standard error over probes.
        nodes: ``(P, m)`` Ritz values per probe (padding has weight 0).
        weights: ``(P, m)`` quadrature weights per probe (each row sums to 1).
        sigma: Gaussian kernel width.
        dim: D.
        n_matvecs: Products spent.
        seed: Probe seed.
    """

    grid: Tensor = field(repr=False)
    density: Tensor = field(repr=False)
    stderr: Tensor = field(repr=False)
    nodes: Tensor = field(repr=False)
    weights: Tensor = field(repr=False)
    sigma: float
    dim: int
    n_matvecs: int
    seed: int | None = None

    @property
    def n_probes(self) -> int:
        """Number of SLQ probes."""
        return int(self.nodes.shape[0])

    def integral(self) -> float:
        """Trapezoid integral of the mean density over the grid (≈ 1)."""
        return float(torch.trapezoid(self.density, self.grid))

    def trace(self) -> TraceEstimate:
        """``tr(A) ≈ D · mean_p Σ_j w_pj θ_pj`` with its probe standard error."""
        per_probe = self.dim * (self.weights * self.nodes).sum(dim=1)
        n = per_probe.shape[0]
        sd = float(per_probe.std(unbiased=True)) if n > 1 else float("nan")
        return TraceEstimate(float(per_probe.mean()), sd / math.sqrt(n) if n > 1 else float("nan"),
                             self.n_matvecs, "slq", n, per_probe, self.seed)

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        """Summary row; ``arrays=True`` adds grid, density, stderr, nodes, weights."""
        d = {"method": "slq", "dim": self.dim, "n_probes": self.n_probes, "sigma": self.sigma,
             "integral": self.integral(), "n_matvecs": self.n_matvecs, "probe_seed": self.seed,
             "min_node": float(self.nodes[self.weights > 0].min()) if self.nodes.numel() else float("nan"),
             "max_node": float(self.nodes[self.weights > 0].max()) if self.nodes.numel() else float("nan")}
        if arrays:
            for k in ("grid", "density", "stderr", "nodes", "weights"):
                d[k] = _array(getattr(self, k))
        return d

    def __repr__(self) -> str:
        return (f"SpectralDensity(D={self.dim}, probes={self.n_probes}, sigma={_fmt(self.sigma)}, "
                f"range=[{_fmt(self.to_dict()['min_node'])}, {_fmt(self.to_dict()['max_node'])}], "
                f"n_matvecs={self.n_matvecs})")


@dataclass(frozen=True)
class DataVarianceTrace:
    """A trace estimated batch by batch, with data and probe variance separated.

    With per-batch estimates ``t_b`` (each unbiased for the batch trace ``T_b``, probe
    standard error ``e_b``) and weights ``w_b`` (``Σ w_b = 1``): ``value = Σ w_b t_b``;
    the observed between-batch variance ``s² = Var_b(t_b)`` decomposes as
    ``Var_b(T_b) + mean_b(e_b²)``, so ``data_var = max(0, s² − mean_b e_b²)`` and
    ``probe_var = mean_b e_b²``.

    Attributes:
        value: Weighted mean of the batch traces (the trace over all batches).
        stderr: Standard error of ``value`` from the spread of the ``t_b``
            (covers both data and probe noise): ``sqrt(Σ w_b² · s²)``.
        probe_stderr: The part of ``stderr`` due to probes alone: ``sqrt(Σ w_b² e_b²)``.
        data_std: ``sqrt(data_var)``: how much one batch's trace varies with the data.
        probe_std: ``sqrt(probe_var)``: typical probe error of one batch estimate.
        batch_values, batch_stderrs: ``(B,)`` per-batch estimates and probe errors.
        n_matvecs: Products spent over all batches.
    """

    value: float
    stderr: float
    probe_stderr: float
    data_std: float
    probe_std: float
    batch_values: Tensor = field(repr=False)
    batch_stderrs: Tensor = field(repr=False)
    n_matvecs: int
    seed: int | None = None

    @property
    def n_batches(self) -> int:
        """Number of data batches B."""
        return int(self.batch_values.shape[0])

    def ci95(self) -> tuple[float, float]:
        """``value ± t_{B-1} · stderr``."""
        h = t_quantile(0.95, self.n_batches - 1) * self.stderr
        return (self.value - h, self.value + h)

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        """Flat row; ``arrays=True`` adds per-batch values and stderrs."""
        lo, hi = self.ci95()
        d = {"method": "hutchinson-per-batch", "value": self.value, "stderr": self.stderr,
             "probe_stderr": self.probe_stderr, "data_std": self.data_std, "probe_std": self.probe_std,
             "ci95_low": lo, "ci95_high": hi, "n_batches": self.n_batches, "n_matvecs": self.n_matvecs,
             "probe_seed": self.seed}
        if arrays:
            d["batch_values"] = _array(self.batch_values)
            d["batch_stderrs"] = _array(self.batch_stderrs)
        return d

    def __repr__(self) -> str:
        return (f"DataVarianceTrace({_fmt(self.value)} ± {_fmt(self.stderr)} "
                f"(data sd {_fmt(self.data_std)}, probe sd {_fmt(self.probe_std)} per batch), "
                f"B={self.n_batches}, n_matvecs={self.n_matvecs})")


@dataclass(frozen=True)
class BackendResult:
    """Trace and top eigenvalues from an external backend (e.g. PyHessian), in our types.

    Attributes:
        backend: ``"pyhessian"``.
        trace: Its trace estimate (``stderr`` computed by us from its per-probe values),
            or ``None``.
        eigen: Its top eigenpairs with residuals ``‖H v − λ v‖`` computed by us, or ``None``.
        n_matvecs: Hessian-vector products it spent (trace + eigenvalues + our residuals).
        stop_rule: How it decided to stop.
    """

    backend: str
    trace: TraceEstimate | None
    eigen: EigenResult | None
    n_matvecs: int
    stop_rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Flat row: trace fields prefixed ``trace_``, eigenvalues and residuals as lists."""
        d: dict[str, Any] = {"backend": self.backend, "n_matvecs": self.n_matvecs, "stop_rule": self.stop_rule}
        if self.trace is not None:
            d.update({f"trace_{k}": v for k, v in self.trace.to_dict().items()})
        if self.eigen is not None:
            d.update({"eigvals": _array(self.eigen.eigvals), "eig_residuals": _array(self.eigen.residuals),
                      "eig_n_matvecs": self.eigen.n_matvecs})
        return d

    def __repr__(self) -> str:
        parts = [self.backend]
        if self.trace is not None:
            parts.append(f"trace={_fmt(self.trace.value)} ± {_fmt(self.trace.stderr)} ({self.trace.n_probes} probes)")
        if self.eigen is not None:
            parts.append("eigvals=[" + ", ".join(_fmt(v) for v in self.eigen.eigvals.tolist()) + "]")
        return f"BackendResult({', '.join(parts)}, n_matvecs={self.n_matvecs})"
