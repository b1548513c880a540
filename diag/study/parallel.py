"""The study's missing pairs computed in local worker processes (``--workers``) before the study reads them.

:func:`complete_study` is what ``diag study``, ``diag screen`` and ``diag rank-sources`` call: the
missing pairs first in :func:`diag.runtime.workers.run_workers` processes (each target's Hᵀ by one
of them, then the pairs split), then :func:`diag.study.run.run_study` here, which reads every row.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from diag.runtime.distributed import is_distributed
from diag.runtime.workers import run_workers
from diag.study.run import run_study, StudySettings
from diag.transfer.methods import RANKED_METHODS
from diag.table import DEFAULT_STUDY

__all__ = ["complete_study", "parallel_study", "study_pending"]


def study_pending(out_dir: Path, domains: list[str], seeds, variant: str, alpha: float) -> bool:
    """Whether the study folder lacks a plain row of some ordered pair of ``domains`` for a seed of this run.

    A cheap look at ``pairs.csv`` (pairs only: rows of stale settings count as present, and the
    study itself recomputes them in one process).
    """
    path = Path(out_dir) / "pairs.csv"
    wanted = {(s, t, int(seed)) for s in domains for t in domains if s != t for seed in seeds}
    if not path.is_file():
        return bool(wanted)
    cols = ["source", "target", "seed", "variant", "alpha", "method"]
    try:
        df = pd.read_csv(path, usecols=lambda c: c in cols)
    except (ValueError, pd.errors.EmptyDataError):
        return True
    if "method" in df.columns:
        df = df[df["method"] == "plain"]
    if "variant" in df.columns:
        df = df[df["variant"] == variant]
    if "alpha" in df.columns:
        df = df[(df["alpha"] - alpha).abs() < 1e-9]
    have = {(s, t, int(seed)) for s, t, seed in zip(df["source"], df["target"], df.get("seed", 0))}
    return bool(wanted - have)


def parallel_study(ctx, domains: list[str], settings: StudySettings, *, out_dir: Path | None = None,
                   name: str = DEFAULT_STUDY) -> int:
    """Compute the study's missing pairs in ``ctx.workers`` processes first; the worker count used (1: none).

    Nothing happens under torch.distributed, with one worker, or when :func:`study_pending` finds
    every pair; otherwise :func:`diag.study.run.run_study` runs sharded in the workers (each target's
    Hᵀ by one of them, then the pairs split), worker 0 merges the shards, and the caller's own
    ``run_study`` then reads every row. ``mix-ranked`` is left to that call: its ranker learns
    the plain rows of every pair, which no shard holds. The zoo must be complete (``ctx.ensure``) before.
    """
    if is_distributed() or ctx.workers <= 1:
        return 1
    out = Path(out_dir) if out_dir is not None else ctx.store.study_dir(name)
    if not study_pending(out, list(domains), settings.seeds, settings.variant, settings.alpha):
        return 1
    workers = min(ctx.workers, len(domains))
    if any(m in RANKED_METHODS for m in settings.methods):
        settings = replace(settings, methods=tuple(m for m in settings.methods if m not in RANKED_METHODS))
    run_workers(_study_worker, ctx, (list(domains), settings, out), workers)
    return workers


def complete_study(ctx, domains: list[str], settings: StudySettings, *, workspace,
                   shard: tuple[int, int] | None = None, resume: bool = True, out_dir: Path | None = None,
                   name: str = DEFAULT_STUDY):
    """The study of ``domains`` with every pair present: the missing pairs in workers first
    (:func:`parallel_study`, unless a ``shard`` is given or ``resume`` is off), then
    :func:`diag.study.run.run_study` here with the same ``settings``, which reads them (its table).
    """
    if shard is None and resume:
        parallel_study(ctx, list(domains), settings, out_dir=out_dir, name=name)
    return run_study(ctx.store, domains, settings, out_dir=out_dir, shard=shard, resume=resume,
                     progress=ctx.progress, data=ctx.data, name=name, workspace=workspace)


def _study_worker(ctx, domains: list[str], settings: StudySettings, out: Path) -> None:
    """One worker's share of :func:`diag.study.run.run_study` (sharded by its rank)."""
    run_study(ctx.store, domains, settings, out_dir=out, progress=ctx.progress, data=ctx.data,
              workspace=ctx.workspace(settings.alpha, seed=settings.seeds[0], variant=settings.variant))
