"""Lanczos top-k eigenpairs and stochastic Lanczos quadrature (SLQ) densities.

Lanczos builds an orthonormal Krylov basis ``Q_m`` of ``span{q, Aq, …, A^{m-1}q}`` and
the tridiagonal ``T_m = Q_mᵀ A Q_m`` (diagonal ``α``, off-diagonal ``β``). The basis is
kept in float64 and fully re-orthogonalised (two Gram–Schmidt passes per step), so
Ritz pairs stay accurate without ghost eigenvalues. Memory: ``D · m`` float64 numbers for
the basis (88M parameters × 40 iterations = 28 GB), and as many again for the kept products
when they fit (:func:`keeps_products`; else the residuals cost ``k`` more products). Fewer
iterations or a parameter subset hold less.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from diag.curvature.probes import _dim, _matmul, free_memory_bytes, MEMORY_SHARE, rademacher
from diag.curvature.results import EigenResult, SpectralDensity
from train.errors import TvdiagError, unknown

__all__ = ["gradient_start", "lanczos_topk", "lanczos_tridiag", "slq_density"]

log = logging.getLogger(__name__)


def keeps_products(m: int, D: int, device: torch.device | str, free_bytes: int | None = None) -> bool:
    """Whether :func:`lanczos_topk` keeps the ``m`` products ``A q_j`` (``m · D`` float64 numbers).

    Kept, the residuals ``‖A y_i − θ_i y_i‖`` cost no product; dropped, they cost ``k`` more.
    They are kept when basis and products together take at most :data:`~diag.curvature.probes.MEMORY_SHARE`
    of ``free_bytes`` (default :func:`free_memory_bytes` of ``device``): at ViT-B/32 size
    (D = 88M, m = 40) the two take 56 GB, which a 24 GB machine does not have.
    """
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    return 2 * m * D * 8 <= MEMORY_SHARE * free


_WHICH = ("LA", "LM", "SA")


def _orthogonalize(w: Tensor, B: Tensor) -> Tensor:
    """Remove the components of ``w`` along the orthonormal rows of ``B`` (twice)."""
    if B.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - B.T @ (B @ w)
    return w


def lanczos_tridiag(A, q0: Tensor, num_iters: int, generator: torch.Generator | None = None,
                    stop: callable | None = None, random_start: bool = True,
                    products: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Run ``num_iters`` Lanczos steps with full re-orthogonalisation from ``q0``.

    On breakdown (``β_j ≈ 0``: the Krylov space is invariant) the run restarts from a
    random vector orthogonal to the basis with ``β_j = 0``, as long as ``generator`` is
    given; otherwise it stops early (the Ritz values found are then exact). At a
    breakdown ``stop`` is consulted only when the current Krylov block started from a
    random vector (``random_start`` or a restart): then its extreme Ritz value is almost
    surely the extreme eigenvalue of what is left of ``A``. A block from a given start
    vector may sit in a small invariant subspace with larger eigenvalues outside it, so
    the run restarts instead.

    Long because the three-term recurrence, full re-orthogonalisation, breakdown restarts
    and the stop test share the loop state; split, each would pass it all around.

    Args:
        A: Symmetric operator ``(D, D)``.
        q0: Start vector (normalised here), float64.
        num_iters: Maximal Krylov dimension m (capped at D).
        generator: CPU generator for restart vectors.
        stop: Optional ``stop(alpha, beta) -> bool`` checked after each step.
        random_start: ``q0`` is a random vector (not one chosen by the caller).
        products: Optional ``(m, D)`` float64 buffer; row ``j`` receives the product
            ``A q_j`` (before orthogonalisation), so that ``A Q s = productsᵀ s`` costs
            no further product (``D · m`` more float64 numbers).

    Returns:
        ``(alpha (m,), beta (m-1,), Q (D, m), n_matvecs)``, float64.
    """
    D = _dim(A)
    m = min(num_iters, D)
    B = torch.empty(m, D, dtype=torch.float64, device=A.device)  # basis as rows: each vector contiguous
    alpha = torch.zeros(m, dtype=torch.float64)
    beta = torch.zeros(max(m - 1, 0), dtype=torch.float64)
    q = q0.to(device=A.device, dtype=torch.float64)
    q = q / q.norm()
    n_mv = 0
    j = 0
    random_block = random_start
    for j in range(m):
        B[j] = q
        w = _matmul(A, q)
        n_mv += 1
        if products is not None:
            products[j] = w
        alpha[j] = q @ w
        w = _orthogonalize(w, B[:j + 1])
        if j == m - 1:
            break
        b = float(w.norm())
        scale = max(float(alpha[: j + 1].abs().max()), float(beta[:j].abs().max()) if j else 0.0, 1e-300)
        if b <= 1e-10 * scale:
            if generator is None:
                return alpha[: j + 1], beta[:j], B[: j + 1].T, n_mv
            beta[j] = 0.0
            if stop is not None and random_block and stop(alpha[: j + 1], beta[: j + 1]):
                return alpha[: j + 1], beta[:j], B[: j + 1].T, n_mv
            w = torch.randn(D, generator=generator, dtype=torch.float64).to(A.device)
            w = _orthogonalize(w, B[:j + 1])
            q, random_block = w / w.norm(), True
            continue
        q, beta[j] = w / b, b
        if stop is not None and stop(alpha[: j + 1], beta[: j + 1]):
            return alpha[: j + 1], beta[:j], B[: j + 1].T, n_mv
    return alpha[: j + 1], beta[:j], B[: j + 1].T, n_mv


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def _order(theta: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _converged_rule(k: int, tol: float, which: str, value_tol: float | None = None):
    """The early-stop rule of :func:`lanczos_topk`.

    Stop when the residual bounds ``r_i = |β_m s_{m,i}|`` of the ``k`` wanted Ritz values
    are below ``tol · max|θ|`` — or, with ``value_tol``, when their eigenvalue error
    estimates ``r_i² / δ_i`` are below ``value_tol · |θ_i|`` (``δ_i``: distance to the
    nearest other Ritz value, standing in for the gap of the Kato–Temple bound
    ``|θ − λ| ≤ r² / gap``; needs ``k + 1`` Ritz values) *and* the wanted Ritz values moved by
    at most ``value_tol · |θ_i|`` in the last step — and, after a restart (a zero
    ``β``), the extreme Ritz value of the newest Krylov block passes the same test: the
    earlier blocks' Ritz values are exact (zero bounds), but a larger eigenvalue outside
    them only shows up in the newest block.

    Why both: early on, the Ritz values below the top one are far below the eigenvalues they
    will converge to (Cauchy interlacing: ``θ_2 <= λ_2``), so ``δ`` overestimates the gap and
    ``r² / δ`` the accuracy. A top Ritz value still climbing through an unresolved cluster then
    looks converged by the estimate alone (seen on a trained tiny ViT: a stop at 5 products, 10 %
    below ``λ_1``, asked for 0.5 %), but it still moves from step to step.
    """

    def small(theta: Tensor, S: Tensor, idx: Tensor, b: float) -> bool:
        r = (b * S[-1, idx]).abs()
        if value_tol is None:
            return bool((r <= tol * max(float(theta.abs().max()), 1e-300)).all())
        if theta.shape[0] < 2:
            return b == 0.0
        gaps = (theta[idx, None] - theta[None, :]).abs()
        gaps[torch.arange(idx.shape[0]), idx] = math.inf
        return bool((r.pow(2) / gaps.min(dim=1).values <= value_tol * theta[idx].abs()).all())

    last: list[Tensor] = []  # the wanted Ritz values of the previous step (value_tol)

    def settled(wanted: Tensor) -> bool:
        before = last[0] if last else None
        last[:] = [wanted]
        return before is not None and bool(((wanted - before).abs() <= value_tol * wanted.abs()).all())

    def stop(alpha: Tensor, beta: Tensor) -> bool:
        if (tol <= 0 and value_tol is None) or alpha.shape[0] < k + (value_tol is not None):
            return False
        b = float(beta[-1])
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta[:-1]))
        wanted = _order(theta, which)[:k]
        if value_tol is not None and not settled(theta[wanted]):
            return False
        if not small(theta, S, wanted, b):
            return False
        zeros = (beta[:-1] == 0).nonzero()
        if zeros.numel() == 0:
            return True
        start = int(zeros.max()) + 1
        theta_n, S_n = torch.linalg.eigh(_tridiag(alpha[start:], beta[start:-1]))
        return small(theta_n, S_n, _order(theta_n, which)[:1], b)

    return stop


def lanczos_topk(A, k: int, num_iters: int | None = None, seed: int = 0, tol: float = 1e-8,
                 which: str = "LA", v0: Tensor | None = None, value_tol: float | None = None,
                 keep_products: bool | None = None) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator by Lanczos with full re-orthogonalisation.

    Ritz pairs ``(θ_i, Q s_i)`` from ``T = Qᵀ A Q = S Θ Sᵀ``. The run stops early once
    the Lanczos residual bounds ``|β_m s_{m,i}|`` of the wanted ``k`` Ritz values are
    below ``tol · max|θ|``. Residuals ``‖A y_i − θ_i y_i‖`` are computed from the real
    products, not from the recurrence, so they are trustworthy whatever happened in
    floating point: with the kept ``A q_j`` (``A y_i = Σ_j s_ji A q_j``, no further product;
    memory ``2 · D · m`` float64 numbers, basis and products) or, when those do not fit, by
    ``k`` more products ``A y_i`` (memory ``D · m``; :func:`keeps_products`).

    Long because argument checks, the run, the Ritz extraction and the residuals from real
    products are one algorithm read top to bottom (each step is commented).

    Args:
        A: Symmetric operator ``(D, D)``.
        k: Number of eigenpairs (``k <= D``).
        num_iters: Maximal Krylov dimension (default ``min(D, max(4k, 40))``).
        seed: Seed of the Gaussian start vector (and restart vectors).
        tol: Relative tolerance of the early stop (0 disables it).
        which: ``"LA"`` largest algebraic (default), ``"LM"`` largest magnitude,
            ``"SA"`` smallest algebraic.
        v0: Start vector (default a Gaussian one drawn from ``seed``).
        value_tol: Instead of ``tol``, stop once the eigenvalue error estimates
            ``r_i² / δ_i`` are below ``value_tol · |θ_i|`` (see :func:`_converged_rule`):
            the accuracy of the eigenvalues, not of the vectors, e.g. ``1e-3`` to match
            PyHessian's power iteration (relative change ``< 1e-3``) in far fewer products.
        keep_products: keep every product for the residuals (True), or compute the ``k``
            residual products at the end (False); None decides by memory (:func:`keeps_products`).

    Returns:
        :class:`EigenResult` with eigenvalues in the chosen order; ``n_matvecs`` counts the
        residual products when they were made.
    """
    D = _dim(A)
    if which not in _WHICH:
        raise unknown("eigenvalue order", which, _WHICH)
    if not 1 <= k <= D:
        raise ValueError(f"k={k} must be between 1 and D={D}")
    m = min(D, num_iters if num_iters is not None else max(4 * k, 40))
    if m < k:
        raise ValueError(f"num_iters={m} < k={k}")
    g = torch.Generator().manual_seed(int(seed))
    q0 = torch.randn(D, generator=g, dtype=torch.float64) if v0 is None else v0.reshape(-1).double()

    rule = _converged_rule(k, tol, which, value_tol)
    if keep_products is None:
        keep_products = keeps_products(m, D, A.device)
        if not keep_products:
            log.info("lanczos_topk: %d x %d products do not fit in memory; the residuals cost %d more products",
                     m, D, k)
    W = torch.empty(m, D, dtype=torch.float64, device=A.device) if keep_products else None
    alpha, beta, Q, n_mv = lanczos_tridiag(A, q0, m, generator=g, stop=rule,
                                           random_start=v0 is None, products=W)
    theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
    if theta.shape[0] < k:  # breakdown without restart cannot happen with a generator; be safe
        raise RuntimeError(f"Lanczos found only {theta.shape[0]} Ritz values, wanted {k}")
    idx = _order(theta, which)[:k]
    vals = theta[idx]
    s_k = S[:, idx].to(Q.device)
    vecs = Q @ s_k
    del Q  # the basis is not needed any more: room for the residual products
    if W is not None:
        AV = W[: alpha.shape[0]].T @ s_k
    else:
        AV = _matmul(A, vecs)
        n_mv += k
    res = (AV - vecs * vals.to(vecs.device)).norm(dim=0).cpu()
    return EigenResult(vals.cpu(), vecs, res, n_mv, "lanczos", int(alpha.shape[0]))


def gradient_start(A, seed: int = 0) -> Tensor:
    """Start vector ``ĝ + r̂`` for the top eigenpairs of a Hessian operator (float64).

    ``ĝ``: the unit mean gradient (:meth:`HessianOperator.mean_gradient`, read off the
    first-order graph the products keep, so it costs no pass of its own); ``r̂``: the
    unit Gaussian start :func:`lanczos_topk` draws from ``seed``. Near a trained point the
    gradient lies mostly in the top eigenspace (Gur-Ari, Roberts & Dyer 2018), so Lanczos
    from ``ĝ + r̂`` meets the same tolerance in fewer products; the random half keeps every
    eigenvector's weight almost surely non-zero. A heuristic: a gradient aligned with a
    lower eigenvector and nearly orthogonal to the top one can make the residual rule stop
    on the lower eigenvalue — the default start stays random. A zero gradient gives ``r̂``.

    Raises:
        TvdiagError: if ``A`` has no ``mean_gradient`` (not a model Hessian operator).
    """
    if not hasattr(A, "mean_gradient"):
        raise TvdiagError(f"gradient_start needs a HessianOperator (with mean_gradient), got {type(A).__name__}.")
    r = torch.randn(_dim(A), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    g = A.mean_gradient().detach().to("cpu", torch.float64)
    gn = float(g.norm())
    return r / r.norm() + (g / gn if gn > 0 else 0.0)


def slq_density(A, num_probes: int = 8, num_iters: int = 30, seed: int = 0, grid: Tensor | None = None,
                sigma: float | None = None, grid_size: int = 512) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature with Gaussian smoothing.

    For Rademacher probes ``v_p`` (the same stream as :func:`hutchinson_trace` with
    the same seed), ``q_p = v_p/√D`` and ``m`` Lanczos steps give Ritz values ``θ_pj``
    and Gauss quadrature weights ``w_pj = (e₁ᵀ s_pj)²`` (``Σ_j w_pj = 1``), so that
    ``q_pᵀ f(A) q_p ≈ Σ_j w_pj f(θ_pj)``. The density of the eigenvalues,
    ``(1/D) Σ_i δ(x − λ_i)``, is estimated by ``(1/P) Σ_p Σ_j w_pj N(x; θ_pj, σ²)``.
    Since ``Σ_j w_pj θ_pj = q_pᵀ A q_p``, ``D · mean_p Σ_j w_pj θ_pj`` equals the
    Hutchinson trace estimate with the same probes.

    Args:
        A: Symmetric operator ``(D, D)``.
        num_probes: Independent probes P (the stderr is over probes).
        num_iters: Lanczos steps m per probe (capped at D).
        seed: Probe stream.
        grid: Evaluation points; default ``grid_size`` points from ``min θ − 6σ`` to
            ``max θ + 6σ``.
        sigma: Kernel width; default 1 % of the Ritz-value range (or of ``max|θ|``).
        grid_size: Points of the default grid.

    Returns:
        :class:`SpectralDensity`.
    """
    D = _dim(A)
    if num_probes < 1 or num_iters < 1:
        raise ValueError("slq_density needs num_probes >= 1 and num_iters >= 1")
    m = min(num_iters, D)
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    n_mv = 0
    for p in range(num_probes):
        q0 = rademacher(D, seed, p) / math.sqrt(D)
        alpha, beta, _, nm = lanczos_tridiag(A, q0, m, generator=None)
        n_mv += nm
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        r = theta.shape[0]
        nodes[p, :r] = theta
        weights[p, :r] = S[0, :] ** 2
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * spread if spread > 0 else 1e-3 * max(abs(hi), 1.0)
    if grid is None:
        grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_size, dtype=torch.float64)
    grid = grid.to(torch.float64).cpu()
    z = (grid[None, None, :] - nodes[:, :, None]) / sigma
    kern = torch.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    per_probe = (weights[:, :, None] * kern).sum(dim=1)  # (P, G)
    dens = per_probe.mean(dim=0)
    se = per_probe.std(dim=0, unbiased=True) / math.sqrt(num_probes) if num_probes > 1 \
        else torch.full_like(dens, math.nan)
    return SpectralDensity(grid, dens, se, nodes, weights, float(sigma), D, n_mv, seed)
