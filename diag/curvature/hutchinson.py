"""Hutchinson's diagonal and trace estimators for symmetric curvature operators.

(The exact diagonal is :mod:`diag.curvature.exact`, Hutch++ :mod:`diag.curvature.hutchpp`, the trace
with its data variance :mod:`diag.curvature.data_variance`.) The estimators are pure functions of an operator ``A`` that offers ``A.shape``,
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

Sufficient statistics, not samples: the diagonal keeps the running mean and ``M2`` of
the per-probe diagonals ``d_k = v_k ⊙ A v_k`` (two ``(D,)`` vectors) and, for the
standard error of a linear functional ``wᵀdiag(A)`` known in advance, the per-probe
scalars ``d_kᵀw`` (``functionals``). Per-entry ``M2`` cannot give that standard error:
``Var(d_kᵀw) = wᵀ C w`` with ``C`` the full ``D × D`` covariance of ``d_k``, whose sample
estimate is the rank-(n−1) span of the centred ``d_k`` themselves — so a functional
chosen after the run needs the ``(n, D)`` per-probe diagonals (``keep_probes``) or a
replay of the probes from their seeds (same seed, block size and ``n``: bit-identical
``d_k``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diag.curvature.checkpoint import load_state, ProbeCheckpoint, ProbeState, save_state
from diag.curvature.probes import _dim, _matmul, _progress_bar, _split, _stderr, probe_block
from diag.curvature.results import DiagonalEstimate, TraceEstimate
from diag.runtime.distributed import all_reduce_sum
from train.errors import DataError, TvdiagError

__all__ = ["hutchinson_diagonal", "hutchinson_trace"]

log = logging.getLogger(__name__)


DEFAULT_MIN_MATVECS = 8
DEFAULT_MAX_MATVECS = 1000
DEFAULT_NUM_MATVECS = 64
DEFAULT_BLOCK_SIZE = 8


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
        raise DataError(f"block_size={block_size}; must be >= 1")
    if num_matvecs is None and rel_stderr is None:
        num_matvecs = DEFAULT_NUM_MATVECS
    if num_matvecs is not None and num_matvecs < 1:
        raise DataError(f"num_matvecs={num_matvecs}; must be >= 1")
    if rel_stderr is not None and rel_stderr <= 0:
        raise DataError(f"rel_stderr={rel_stderr}; must be > 0")
    return num_matvecs


def _start_state(A, D: int, diagonal: bool, ckpt: ProbeCheckpoint | None, meta: dict, desc: str,
                 functionals: int = 0) -> ProbeState:
    """A resumed state from ``ckpt`` when it holds one, else an empty one (vectors on ``A.device``)."""
    state = load_state(ckpt.path, meta) if ckpt is not None else None
    if state is not None:
        log.info("Resuming %s from %s at probe %d", desc, ckpt.path, state.n)
    else:
        state = ProbeState.empty(D if diagonal else None, functionals)
    if diagonal:
        state.vec_mean = state.vec_mean.to(A.device)
        state.vec_m2 = state.vec_m2.to(A.device)
    return state


def _functionals(W: Tensor | None, D: int) -> tuple[Tensor | None, str | None]:
    """``W`` as a ``(D, m)`` float64 matrix and its checkpoint tag ``"m:sha256[:16]"`` (None, None without)."""
    if W is None:
        return None, None
    W = (W[:, None] if W.ndim == 1 else W).detach().to(torch.float64)
    if W.ndim != 2 or W.shape[0] != D or W.shape[1] < 1:
        raise DataError(f"functionals has shape {tuple(W.shape)}; expected ({D},) or ({D}, m)")
    digest = hashlib.sha256(W.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return W, f"{W.shape[1]}:{digest}"


def _round_functionals(P: Tensor | None, W: Tensor, R: int, rank: int, world: int) -> Tensor:
    """``(R, m)`` per-probe scalars ``d_kᵀ w_j`` of a round (``d_k`` the columns of ``P``), all ranks'.

    One matrix-vector product per functional, so column ``j`` does not depend on how many
    functionals there are (a run with more functionals gives the same scalars bit for bit).
    """
    out = torch.zeros(R, W.shape[1], dtype=torch.float64)
    if P is not None:
        out[rank:R:world] = torch.stack([W[:, j].to(P.device) @ P for j in range(W.shape[1])], dim=1).cpu()
    return all_reduce_sum(out) if world > 1 else out


def _probe_round(A, D: int, seed: int, first: int, R: int, rank: int, world: int) -> tuple[Tensor, Tensor | None]:
    """Probes ``first .. first+R-1``: this rank's share as one ``(D, k)`` block.

    Returns ``(vals, P)``: the ``(R,)`` totals ``vᵀAv`` of all ranks (all-reduced) and
    this rank's ``(D, k)`` columns ``v ⊙ A v`` (None when it has no probe this round).
    """
    pos = list(range(rank, R, world))
    vals = torch.zeros(R, dtype=torch.float64)
    P = None
    if pos:
        V = probe_block(D, seed, [first + j for j in pos], A.dtype, A.device)
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
                keep: list[Tensor] | None = None, functionals: Tensor | None = None) -> tuple[ProbeState, bool | None]:
    """Run Hutchinson probes in rounds until ``num_matvecs`` or the target error.

    A round takes the next ``W · block_size`` probes (W ranks); each rank multiplies
    its probes as one ``(D, k)`` block (:func:`_probe_round`). Per-probe totals ``vᵀAv``
    are fed to a scalar Welford update in probe order; for the diagonal, the round's
    vectors ``v ⊙ Av`` are merged with :func:`_merge_diagonal`, their scalars against
    ``functionals`` appended to ``state.fvalues`` (:func:`_round_functionals`) and, with
    ``keep`` a list, the vectors themselves appended to it as ``(D, R)`` blocks.

    Long because the round loop interleaves the estimate, the checkpoint, the progress bar
    and the callback, each of which needs the state between rounds.
    """
    D = _dim(A)
    num_matvecs = _check_probe_args(block_size, num_matvecs, rel_stderr)
    n_max = num_matvecs if num_matvecs is not None else max_matvecs
    rank, world = _split(A, split_probes)
    ckpt = ProbeCheckpoint.coerce(checkpoint)
    W, tag = _functionals(functionals, D)
    meta = {"kind": "diagonal" if diagonal else "trace", "seed": seed, "dim": D, "dtype": str(A.dtype),
            "block_size": block_size, "world": world, **({"functionals": tag} if tag else {})}
    state = _start_state(A, D, diagonal, ckpt, meta, desc, 0 if W is None else W.shape[1])
    if W is not None:
        W = W.to(A.device)
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
            if W is not None:
                state.fvalues = torch.cat([state.fvalues, _round_functionals(P, W, R, rank, world)])
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
                      None if s.vec_m2 is None else s.vec_m2.cpu(), s.fvalues)


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
                        split_probes: bool | None = None, keep_probes: bool = False,
                        functionals: Tensor | None = None) -> DiagonalEstimate:
    """Hutchinson diagonal ``diag(A) ≈ (1/n) Σ_i v_i ⊙ A v_i`` with per-entry stderr.

    Uses the same probes as :func:`hutchinson_trace` with the same seed, so ``total``
    equals that trace estimate. The stopping rule ``rel_stderr`` applies to the total
    (the trace); per-entry errors are reported in ``stderr`` and are typically much
    larger in relative terms (relative sd ≈ sqrt((1/ρ_i − 1)/n) with
    ``ρ_i = A_ii² / Σ_j A_ij²``).

    What is kept grows with ``D`` (the running mean and ``M2``, two ``(D,)`` float64
    vectors) or with the probes (``n`` scalars per functional), never with ``n · D``
    unless ``keep_probes`` asks for it.

    Args: as :func:`hutchinson_trace`, and
        keep_probes: Also return the per-probe diagonals ``v_k ⊙ A v_k`` as
            ``probe_diagonals`` (``(n, D)`` float64: ``n · D · 8`` bytes), from which
            any linear functional of the diagonal gets a standard error (e.g.
            :func:`diag.curvature.risk.risk_diagonal_estimate`). Not with a resumed checkpoint.
        functionals: ``(D,)`` or ``(D, m)`` weights ``w_j``: the per-probe scalars
            ``d_kᵀ w_j`` come back as ``probe_functionals`` (``(n, m)``; checkpointed, so a
            resumed run returns them too), from which ``w_jᵀ diag(A)`` gets its standard error
            without the probes (:func:`diag.curvature.risk.risk_diagonal_estimate` with
            ``w_j = τ²``).

    Returns:
        :class:`DiagonalEstimate`.
    """
    keep: list[Tensor] | None = [] if keep_probes else None
    state, conv = _probe_loop(A, diagonal=True, num_matvecs=num_matvecs, rel_stderr=rel_stderr,
                              max_matvecs=max_matvecs, min_matvecs=min_matvecs, seed=seed,
                              block_size=block_size, checkpoint=checkpoint, progress=progress,
                              callback=callback, split_probes=split_probes, desc="hutchinson diagonal", keep=keep,
                              functionals=functionals)
    n = state.n
    se = (state.vec_m2.clamp_min(0) / (n - 1) / n).sqrt() if n > 1 else torch.full_like(state.vec_mean, math.nan)
    probes = torch.cat(keep, dim=1).T.contiguous() if keep else None
    return DiagonalEstimate(state.vec_mean, se, n, float(state.mean), _stderr(state.m2, n), "hutchinson", n,
                            seed, conv, rel_stderr, probes, state.fvalues)


