"""Diagonal and trace estimators for symmetric curvature operators.

All estimators are pure functions of an operator ``A`` that offers ``A.shape``,
``A.dtype``, ``A.device`` and ``A @ V`` for ``V`` of shape ``(D,)`` or ``(D, k)``.
Products run in the operator's dtype; every reduction runs in float64.

Probes are Rademacher vectors; probe ``i`` of a run with seed ``s`` is drawn on the
CPU from its own generator seeded with :func:`probe_seed` ``(s, i)``, so a run is
reproducible, can stop and resume anywhere (see :mod:`diag.curvature.checkpoint`) and
can be split across processes: under ``torch.distributed`` rank ``r`` of ``W`` takes
the probes ``i`` with ``i % W == r`` and the running sums are all-reduced, so every
rank returns the same estimate as one process with the same seed.

Hutchinson (1990): for ``E[v vᵀ] = I``, ``E[vᵀ A v] = tr(A)`` and
``E[v ⊙ A v] = diag(A)``; with Rademacher ``v`` the variance of ``vᵀ A v`` is
``2 Σ_{i≠j} A_ij²`` and that of entry ``i`` is ``Σ_{j≠i} A_ij²``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from diag.curvature.checkpoint import ProbeCheckpoint, ProbeState, load_state, save_state
from diag.curvature.distributed import all_reduce_sum, is_distributed, rank_and_world
from diag.curvature.results import DataVarianceTrace, DiagonalEstimate, TraceEstimate
from train.errors import TvdiagError

__all__ = [
    "probe_seed",
    "rademacher",
    "exact_diagonal",
    "exact_trace",
    "hutchinson_trace",
    "hutchinson_diagonal",
    "hutchpp_trace",
    "trace_with_data_variance",
]

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
DEFAULT_MIN_MATVECS = 8
DEFAULT_MAX_MATVECS = 1000
DEFAULT_NUM_MATVECS = 64
DEFAULT_BLOCK_SIZE = 8


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def probe_seed(seed: int, index: int) -> int:
    """The generator seed of probe ``index`` in the stream ``seed`` (SplitMix64 mix, < 2⁶³).

    Example:
        >>> probe_seed(0, 1) == probe_seed(0, 1) != probe_seed(1, 0)
        True
    """
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(index) & _MASK64)) >> 1


def rademacher(dim: int, seed: int, index: int, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> Tensor:
    """Probe ``index`` of stream ``seed``: a ``(dim,)`` vector of ±1.

    Drawn on the CPU (the same numbers on every device), then moved to ``device``.
    """
    g = torch.Generator().manual_seed(probe_seed(seed, index))
    bits = torch.randint(0, 2, (dim,), generator=g, dtype=torch.int8)
    return (bits.to(dtype) * 2 - 1).to(device)


# ----------------------------------------------------------------------------- helpers


def _dim(A) -> int:
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"Expected a square operator, got shape {shape}")
    return int(shape[0])


def _matmul(A, V: Tensor) -> Tensor:
    """``A @ V`` with ``V`` cast to the operator's dtype/device; the result as float64."""
    out = A @ V.to(dtype=A.dtype, device=A.device)
    return out.to(torch.float64)


def _split(A, split_probes: bool | None) -> tuple[int, int]:
    """(rank, world) over which probes are split.

    By default probes are split whenever torch.distributed is initialised, unless the
    operator itself is data-parallel (``A.data_parallel`` true, or one of tvdiag's
    model operators, whose products are all-reduced): then every rank must call
    ``A @ v`` with the same ``v`` and probes are not split.
    """
    if split_probes is None:
        data_parallel = getattr(A, "data_parallel", None)
        if data_parallel is None:  # tvdiag's model operators all-reduce every product
            from diag.curvature.operators import _ModelOperator

            data_parallel = isinstance(A, _ModelOperator)
        split_probes = is_distributed() and not data_parallel
    return rank_and_world() if split_probes else (0, 1)


def _progress_bar(enabled: bool | None, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _stderr(m2: float, n: int) -> float:
    return math.sqrt(max(m2, 0.0) / (n - 1) / n) if n > 1 else math.nan


# ----------------------------------------------------------------------------- exact


def exact_diagonal(A, chunk_size: int = 32, progress: bool | None = None,
                   split_probes: bool | None = None) -> DiagonalEstimate:
    """``diag(A)`` from D products with unit vectors: ``A_ii = e_iᵀ A e_i``.

    Columns are multiplied ``chunk_size`` at a time as ``(D, k)`` blocks; under
    ``torch.distributed`` chunk ``c`` goes to rank ``c % W`` and the result is summed.

    Args:
        A: Symmetric operator of shape ``(D, D)``.
        chunk_size: Unit vectors per product.
        progress: Show a tqdm bar.
        split_probes: Split chunks over ranks (default: when distributed and the
            operator is not data-parallel).

    Returns:
        A :class:`DiagonalEstimate` with ``method="exact"`` and zero standard errors.

    Example:
        >>> import torch
        >>> class M:  # any object with shape/dtype/device/@
        ...     def __init__(s, a): s.a, s.shape, s.dtype, s.device = a, a.shape, a.dtype, a.device
        ...     def __matmul__(s, v): return s.a @ v
        >>> exact_diagonal(M(torch.tensor([[2., 1.], [1., 3.]], dtype=torch.float64))).mean.tolist()
        [2.0, 3.0]
    """
    D = _dim(A)
    rank, world = _split(A, split_probes)
    diag = torch.zeros(D, dtype=torch.float64, device=A.device)
    n_chunks = math.ceil(D / chunk_size) if D else 0
    bar = _progress_bar(progress and rank == 0, D, "exact diagonal")
    n_matvecs = 0
    for c in range(n_chunks):
        start, stop = c * chunk_size, min(D, (c + 1) * chunk_size)
        if c % world == rank:
            k = stop - start
            E = torch.zeros(D, k, dtype=A.dtype, device=A.device)
            cols = torch.arange(k, device=A.device)
            E[start + cols, cols] = 1
            AE = _matmul(A, E)
            diag[start:stop] = AE[start + cols, cols]
        n_matvecs += stop - start
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    if world > 1:
        diag = all_reduce_sum(diag)
    total = float(diag.sum())
    return DiagonalEstimate(diag, torch.zeros_like(diag), n_matvecs, total, 0.0, "exact", 0)


def exact_trace(A, chunk_size: int = 32, progress: bool | None = None) -> TraceEstimate:
    """``tr(A) = Σ_i e_iᵀ A e_i`` exactly (D products); ``stderr = 0``."""
    d = exact_diagonal(A, chunk_size=chunk_size, progress=progress)
    return TraceEstimate(d.total, 0.0, d.n_matvecs, "exact", 0)


# ----------------------------------------------------------------------------- Hutchinson core


def _welford_update(state: ProbeState, x: float) -> None:
    state.n += 1
    delta = x - state.mean
    state.mean += delta / state.n
    state.m2 += delta * (x - state.mean)
    state.values = torch.cat([state.values, torch.tensor([x], dtype=torch.float64)])


def _check_probe_args(block_size: int, num_matvecs: int | None, rel_stderr: float | None) -> int | None:
    """Validate the loop settings; returns ``num_matvecs`` (64 when neither stop rule is given)."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}; must be >= 1")
    if num_matvecs is None and rel_stderr is None:
        num_matvecs = DEFAULT_NUM_MATVECS
    if num_matvecs is not None and num_matvecs < 1:
        raise ValueError(f"num_matvecs={num_matvecs}; must be >= 1")
    if rel_stderr is not None and rel_stderr <= 0:
        raise ValueError(f"rel_stderr={rel_stderr}; must be > 0")
    return num_matvecs


def _start_state(A, D: int, diagonal: bool, ckpt: ProbeCheckpoint | None, meta: dict, desc: str) -> ProbeState:
    """A resumed state from ``ckpt`` when it holds one, else an empty one (vectors on ``A.device``)."""
    state = load_state(ckpt.path, meta) if ckpt is not None else None
    if state is not None:
        log.info("Resuming %s from %s at probe %d", desc, ckpt.path, state.n)
    else:
        state = ProbeState.empty(D if diagonal else None)
    if diagonal:
        state.vec_mean = state.vec_mean.to(A.device)
        state.vec_m2 = state.vec_m2.to(A.device)
    return state


def _probe_round(A, D: int, seed: int, first: int, R: int, rank: int, world: int) -> tuple[Tensor, Tensor | None]:
    """Probes ``first .. first+R-1``: this rank's share as one ``(D, k)`` block.

    Returns ``(vals, P)``: the ``(R,)`` totals ``vᵀAv`` of all ranks (all-reduced) and
    this rank's ``(D, k)`` columns ``v ⊙ A v`` (None when it has no probe this round).
    """
    pos = list(range(rank, R, world))
    vals = torch.zeros(R, dtype=torch.float64)
    P = None
    if pos:
        V = torch.stack([rademacher(D, seed, first + j, A.dtype, "cpu") for j in pos], dim=1).to(A.device)
        P = V.to(torch.float64) * _matmul(A, V)
        vals[pos] = P.sum(dim=0).cpu()
    if world > 1:
        vals = all_reduce_sum(vals)
    return vals, P


def _merge_diagonal(state: ProbeState, P: Tensor | None, R: int, world: int, D: int, device) -> None:
    """Merge a round's vectors into the running mean/M2 (Chan: ``M2 = M2_a + M2_b + δ² n_a n_b / n``)."""
    zeros = torch.zeros(D, dtype=torch.float64, device=device)
    s1 = P.sum(dim=1) if P is not None else zeros
    m_b = all_reduce_sum(s1) / R if world > 1 else s1 / R
    q = ((P - m_b[:, None]) ** 2).sum(dim=1) if P is not None else zeros
    if world > 1:
        q = all_reduce_sum(q)
    n_a = state.n
    n = n_a + R
    delta = m_b - state.vec_mean
    state.vec_mean = state.vec_mean + delta * (R / n)
    state.vec_m2 = state.vec_m2 + q + delta ** 2 * (n_a * R / n)


def _all_columns(P: Tensor | None, R: int, rank: int, world: int, D: int, device) -> Tensor:
    """The round's ``(D, R)`` vectors ``v ⊙ A v`` of every rank, in probe order."""
    if world == 1:
        return P
    full = torch.zeros(D, R, dtype=torch.float64, device=device)
    if P is not None:
        full[:, rank:R:world] = P
    return all_reduce_sum(full)


def _probe_loop(A, *, diagonal: bool, num_matvecs: int | None, rel_stderr: float | None,
                max_matvecs: int, min_matvecs: int, seed: int, block_size: int,
                checkpoint, progress: bool | None, callback: Callable[[ProbeState], Any] | None,
                split_probes: bool | None, desc: str,
                keep: list[Tensor] | None = None) -> tuple[ProbeState, bool | None]:
    """Run Hutchinson probes in rounds until ``num_matvecs`` or the target error.

    A round takes the next ``W · block_size`` probes (W ranks); each rank multiplies
    its probes as one ``(D, k)`` block (:func:`_probe_round`). Per-probe totals ``vᵀAv``
    are fed to a scalar Welford update in probe order; for the diagonal, the round's
    vectors ``v ⊙ Av`` are merged with :func:`_merge_diagonal` and, with ``keep`` a
    list, also appended to it as ``(D, R)`` blocks (per-probe diagonals).
    """
    D = _dim(A)
    num_matvecs = _check_probe_args(block_size, num_matvecs, rel_stderr)
    n_max = num_matvecs if num_matvecs is not None else max_matvecs
    rank, world = _split(A, split_probes)
    ckpt = ProbeCheckpoint.coerce(checkpoint)
    meta = {"kind": "diagonal" if diagonal else "trace", "seed": seed, "dim": D, "dtype": str(A.dtype),
            "block_size": block_size, "world": world}
    state = _start_state(A, D, diagonal, ckpt, meta, desc)
    if keep is not None and state.n > 0:
        raise TvdiagError(f"Cannot keep per-probe diagonals of a run resumed at probe {state.n}; "
                          "start without the checkpoint or do not keep probes.")

    def converged() -> bool:
        return (rel_stderr is not None and state.n >= max(min_matvecs, 2)
                and state.mean != 0 and _stderr(state.m2, state.n) <= rel_stderr * abs(state.mean))

    bar = _progress_bar(progress and rank == 0, n_max, desc)
    if bar is not None:
        bar.update(state.n)
    last_saved = state.n
    while state.n < n_max and not converged():
        R = min(world * block_size, n_max - state.n)
        vals, P = _probe_round(A, D, seed, state.n, R, rank, world)
        if diagonal:
            _merge_diagonal(state, P, R, world, D, A.device)
            if keep is not None:
                keep.append(_all_columns(P, R, rank, world, D, A.device))
        for x in vals.tolist():
            _welford_update(state, x)
        if ckpt is not None and state.n - last_saved >= ckpt.every:
            if rank == 0:
                save_state(ckpt.path, _cpu_state(state), meta)
            last_saved = state.n
        if bar is not None:
            bar.update(R)
            bar.set_postfix_str(f"{state.mean:.5g} ± {_stderr(state.m2, state.n):.2g}")
        if callback is not None:
            callback(state)
    if bar is not None:
        bar.close()
    if ckpt is not None and state.n != last_saved and rank == 0:
        save_state(ckpt.path, _cpu_state(state), meta)
    return state, _report_convergence(state, rel_stderr, converged, desc)


def _report_convergence(state: ProbeState, rel_stderr: float | None, converged: Callable[[], bool],
                        desc: str) -> bool | None:
    """None without a target error; else whether it was met (a warning when not)."""
    if rel_stderr is None:
        return None
    conv = converged()
    if not conv:
        log.warning("%s stopped after %d probes at relative stderr %.3g (target %.3g)", desc, state.n,
                    _stderr(state.m2, state.n) / abs(state.mean) if state.mean else math.inf, rel_stderr)
    return conv


def _cpu_state(s: ProbeState) -> ProbeState:
    return ProbeState(s.n, s.values, s.mean, s.m2,
                      None if s.vec_mean is None else s.vec_mean.cpu(),
                      None if s.vec_m2 is None else s.vec_m2.cpu())


def hutchinson_trace(A, num_matvecs: int | None = None, rel_stderr: float | None = None,
                     max_matvecs: int = DEFAULT_MAX_MATVECS, min_matvecs: int = DEFAULT_MIN_MATVECS,
                     seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                     checkpoint: ProbeCheckpoint | str | os.PathLike | None = None,
                     progress: bool | None = None, callback: Callable[[ProbeState], Any] | None = None,
                     split_probes: bool | None = None) -> TraceEstimate:
    """Hutchinson trace estimate ``tr(A) ≈ (1/n) Σ_i v_iᵀ A v_i`` with Rademacher ``v_i``.

    The standard error is ``s/√n`` with ``s`` the sample standard deviation of the
    per-probe values (Welford, float64); the CI uses Student's t with n−1 dof.

    Args:
        A: Symmetric operator ``(D, D)``.
        num_matvecs: Fixed number of probes (one product each). If neither this nor
            ``rel_stderr`` is given, 64 probes.
        rel_stderr: Stop once ``stderr / |estimate| <= rel_stderr`` — checked after
            every round, but never before ``min_matvecs`` probes (PyHessian stops after
            as few as two, where the error estimate itself is unreliable).
        max_matvecs: Cap for the ``rel_stderr`` rule.
        min_matvecs: Probes before the stopping rule applies.
        seed: Probe stream; probe ``i`` uses ``probe_seed(seed, i)``.
        block_size: Probes per product (a ``(D, block_size)`` block per rank; a model
            operator shares one first-order graph per batch across the block).
        checkpoint: A path or :class:`ProbeCheckpoint`; the running sums are saved
            there every ``every`` probes and a later call with the same path resumes.
        progress: Show a tqdm bar with the current estimate ± stderr.
        callback: Called with the running :class:`ProbeState` after every round.
        split_probes: Split probes over torch.distributed ranks (default: when
            distributed and ``A`` is not data-parallel).

    Returns:
        :class:`TraceEstimate` with ``probe_values``.
    """
    state, conv = _probe_loop(A, diagonal=False, num_matvecs=num_matvecs, rel_stderr=rel_stderr,
                              max_matvecs=max_matvecs, min_matvecs=min_matvecs, seed=seed,
                              block_size=block_size, checkpoint=checkpoint, progress=progress,
                              callback=callback, split_probes=split_probes, desc="hutchinson trace")
    return TraceEstimate(state.mean, _stderr(state.m2, state.n), state.n, "hutchinson", state.n,
                         state.values, seed, conv, rel_stderr)


def hutchinson_diagonal(A, num_matvecs: int | None = None, rel_stderr: float | None = None,
                        max_matvecs: int = DEFAULT_MAX_MATVECS, min_matvecs: int = DEFAULT_MIN_MATVECS,
                        seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                        checkpoint: ProbeCheckpoint | str | os.PathLike | None = None,
                        progress: bool | None = None, callback: Callable[[ProbeState], Any] | None = None,
                        split_probes: bool | None = None, keep_probes: bool = False) -> DiagonalEstimate:
    """Hutchinson diagonal ``diag(A) ≈ (1/n) Σ_i v_i ⊙ A v_i`` with per-entry stderr.

    Uses the same probes as :func:`hutchinson_trace` with the same seed, so ``total``
    equals that trace estimate. The stopping rule ``rel_stderr`` applies to the total
    (the trace); per-entry errors are reported in ``stderr`` and are typically much
    larger in relative terms (relative sd ≈ sqrt((1/ρ_i − 1)/n) with
    ``ρ_i = A_ii² / Σ_j A_ij²``).

    Args: as :func:`hutchinson_trace`, and
        keep_probes: Also return the per-probe diagonals ``v_k ⊙ A v_k`` as
            ``probe_diagonals`` (``(n, D)`` float64: ``n · D · 8`` bytes), from which
            any linear functional of the diagonal gets a standard error (e.g.
            :func:`diag.curvature.risk.risk_diagonal_estimate`). Not with a resumed checkpoint.

    Returns:
        :class:`DiagonalEstimate`.
    """
    keep: list[Tensor] | None = [] if keep_probes else None
    state, conv = _probe_loop(A, diagonal=True, num_matvecs=num_matvecs, rel_stderr=rel_stderr,
                              max_matvecs=max_matvecs, min_matvecs=min_matvecs, seed=seed,
                              block_size=block_size, checkpoint=checkpoint, progress=progress,
                              callback=callback, split_probes=split_probes, desc="hutchinson diagonal", keep=keep)
    n = state.n
    se = (state.vec_m2.clamp_min(0) / (n - 1) / n).sqrt() if n > 1 else torch.full_like(state.vec_mean, math.nan)
    probes = torch.cat(keep, dim=1).T.contiguous() if keep else None
    return DiagonalEstimate(state.vec_mean, se, n, float(state.mean), _stderr(state.m2, n), "hutchinson", n,
                            seed, conv, rel_stderr, probes)


# ----------------------------------------------------------------------------- Hutch++


def _apply_blocks(A, V: Tensor, block_size: int) -> Tensor:
    return torch.cat([_matmul(A, V[:, s:s + block_size]) for s in range(0, V.shape[1], block_size)], dim=1)


def hutchpp_trace(A, num_matvecs: int, seed: int = 0, block_size: int = 8) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) trace estimate.

    With ``k = num_matvecs // 3``: sketch ``Q = orth(A S)`` from ``k`` Rademacher
    probes, then ``tr(A) ≈ tr(Qᵀ A Q) + (1/k) Σ_j g_jᵀ (I−QQᵀ) A (I−QQᵀ) g_j`` with
    ``k`` fresh probes ``g_j``. The low-rank part is exact given ``Q``; the standard
    error is that of the Hutchinson part, ``s/√k`` (conditional on ``Q``, where the
    estimator is unbiased). For PSD ``A`` it needs O(1/ε) products for relative error
    ε instead of Hutchinson's O(1/ε²).

    Args:
        A: Symmetric operator ``(D, D)``.
        num_matvecs: Total products (at least 3; rounded down to a multiple of 3).
        seed: Probe stream: ``S`` uses probes ``0..k-1``, ``g`` probes ``k..2k-1``.
        block_size: Columns per product.

    Returns:
        :class:`TraceEstimate` with ``method="hutch++"``; ``probe_values`` are the
        ``k`` conditional estimates ``tr(QᵀAQ) + g_jᵀ(I−P)A(I−P)g_j``.
    """
    D = _dim(A)
    k = num_matvecs // 3
    if k < 1:
        raise ValueError(f"hutchpp_trace needs num_matvecs >= 3, got {num_matvecs}")
    k_sketch = min(k, D)
    S = torch.stack([rademacher(D, seed, i) for i in range(k_sketch)], dim=1).to(A.device)
    G = torch.stack([rademacher(D, seed, k + i) for i in range(k)], dim=1).to(A.device)
    Q, _ = torch.linalg.qr(_apply_blocks(A, S, block_size))
    low = float(torch.einsum("ij,ij->", Q, _apply_blocks(A, Q, block_size)))
    Gp = G - Q @ (Q.T @ G)
    x = torch.einsum("ij,ij->j", Gp, _apply_blocks(A, Gp, block_size)).cpu()
    sd = float(x.std(unbiased=True)) if k > 1 else math.nan
    return TraceEstimate(low + float(x.mean()), sd / math.sqrt(k) if k > 1 else math.nan,
                         2 * k_sketch + k, "hutch++", k, low + x, seed)


# ----------------------------------------------------------------------------- data variance


def _batch_size(batch) -> int | None:
    try:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(x.shape[0])
    except (AttributeError, IndexError, TypeError):
        return None


def trace_with_data_variance(make_operator: Callable[[Any], Any], batches: Iterable[Any],
                             num_matvecs: int | None = None, rel_stderr: float | None = None,
                             seed: int = 0, weights: Sequence[float] | None = None,
                             progress: bool | None = None, **kwargs) -> DataVarianceTrace:
    """Trace over B data batches, separating data-resampling from probe variance.

    Each batch ``b`` gets its own operator ``A_b = make_operator(batch_b)`` (e.g. the
    Hessian of the loss on that batch) and an independent Hutchinson estimate ``t_b``
    (probe stream ``probe_seed(seed, b)``) with probe error ``e_b``. The full-data
    trace is ``Σ w_b tr(A_b)`` with ``w_b`` proportional to batch sizes (for a mean
    loss). Because ``E[s²] = Var_b(tr A_b) + mean_b e_b²`` for the between-batch
    sample variance ``s²`` of the ``t_b``, the data variance is
    ``max(0, s² − mean_b e_b²)``.

    Args:
        make_operator: ``batch -> operator``.
        batches: At least two batches.
        num_matvecs, rel_stderr: Per batch, as in :func:`hutchinson_trace`.
        seed: Base seed.
        weights: Batch weights (normalised to sum 1); default: batch sizes when the
            batches are ``(x, y)`` tensors, else equal.
        progress: Show a bar over batches.
        **kwargs: Passed to :func:`hutchinson_trace`.

    Returns:
        :class:`DataVarianceTrace`.

    Raises:
        DataError: fewer than two batches.
    """
    from train.errors import DataError

    batches = list(batches)
    B = len(batches)
    if B < 2:
        raise DataError(f"trace_with_data_variance needs at least 2 batches, got {B}")
    if weights is None:
        sizes = [_batch_size(b) for b in batches]
        weights = sizes if all(s is not None for s in sizes) else [1.0] * B
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.shape[0] != B or (w <= 0).any():
        raise ValueError(f"weights must be {B} positive numbers, got {list(weights)}")
    w = w / w.sum()
    vals, ses, n_mv = [], [], 0
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="per-batch trace", leave=False)
    for b, batch in enumerate(it):
        est = hutchinson_trace(make_operator(batch), num_matvecs=num_matvecs, rel_stderr=rel_stderr,
                               seed=probe_seed(seed, b), **kwargs)
        vals.append(est.value)
        ses.append(est.stderr)
        n_mv += est.n_matvecs
    t = torch.tensor(vals, dtype=torch.float64)
    e = torch.tensor(ses, dtype=torch.float64)
    s2 = float(t.var(unbiased=True))
    probe_var = float((e ** 2).mean())
    data_var = max(0.0, s2 - probe_var)
    w2 = float((w ** 2).sum())
    return DataVarianceTrace(float((w * t).sum()), math.sqrt(w2 * s2), math.sqrt(float((w ** 2 * e ** 2).sum())),
                             math.sqrt(data_var), math.sqrt(probe_var), t, e, n_mv, seed)
