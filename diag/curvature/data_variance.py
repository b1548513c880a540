"""Trace over data batches, separating the data-resampling variance from the probe variance."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from diag.curvature.hutchinson import hutchinson_trace
from diag.curvature.probes import probe_seed
from diag.curvature.results import DataVarianceTrace
from train.errors import DataError

__all__ = ["trace_with_data_variance"]


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

    Long because the per-batch estimates, their weights and the variance split are one
    computation whose intermediate sums are all reported in the result.

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

