"""Work split across ``torchrun`` ranks: zoo domains and the study's target curvatures.

Outside torch.distributed every function here runs the whole job in this process. Under
``torchrun`` (the process group is joined once, in :func:`diag.cli.main`):

* :func:`build_domains` — θ_base is built (or checked) by rank 0 alone while the others wait;
  then each domain is claimed by one free rank (:func:`~diag.runtime.distributed.claimed`, a
  dynamic queue) with all its seeds (its head, θ_ft, φ and θ_ft* of every α and variant), so
  each artifact is written by exactly one process (atomically,
  :func:`train.tensorio.save_tensors`). A final barrier means every rank may read every domain
  afterwards.
* :func:`build_curvatures` — before the study's pairs are handed out, each target's Hᵀ (diagonal
  and card, cached in the store) is claimed by one free rank and computed on all its images,
  exactly as one process would; the pairs then read it from the store.

Every rank must call these functions in the same order (they hold barriers).

Outside torch.distributed, a context with ``workers > 1`` (``--workers``) runs
:func:`build_domains` in that many local processes when more than one domain has work left
(:mod:`diag.runtime.workers`), θ_base first in this process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from diag.runtime.distributed import barrier, claimed, gather_json, is_distributed, rank_and_world
from diag.runtime.workers import release_freed_memory, run_workers

__all__ = ["build_curvatures", "build_domains", "shared_start_time"]


def shared_start_time(started: float) -> float:
    """The earliest ``started`` of all ranks (``--rebuild`` then spares what any rank of this run wrote)."""
    return min(gather_json(started))


def build_domains(ctx, domains: Sequence[str], alphas: Sequence[float], explain: bool = True,
                  variants: Sequence[str] = ("paper",), seeds: Sequence[int] = (0,),
                  zero_shot: bool = False) -> dict:
    """Build whatever is missing for ``domains`` (θ_base first), sharded by domain over the ranks.

    Args:
        ctx: the :class:`diag.runtime.context.Context` of this invocation (its zoos build).
        domains, alphas, variants, seeds: what to build; ``explain=False`` stops after θ_ft.
        zero_shot: also measure θ_base's zero-shot test accuracy of each domain (on its rank).

    Returns:
        On every rank: ``{"seconds": {"base", <domain>..., "total"}, "zero_shot_accuracy":
        {domain: acc}, "rank_of": {domain: rank}, "built": [[paths written by rank r], ...]}``.
        Seconds of a domain are its owner's wall time over all seeds.
    """
    domains, seeds = list(dict.fromkeys(domains)), list(dict.fromkeys(seeds))
    _announce_first_build(ctx, domains, seeds)
    if not is_distributed() and getattr(ctx, "workers", 1) > 1:
        pending = _pending(ctx, domains, alphas, explain, variants, seeds)
        if len(pending) > 1:  # θ_base exists now (built with every thread); the domains go to the workers

            workers = min(ctx.workers, len(pending))
            report = run_workers(build_domains, ctx, (domains, alphas, explain, variants, seeds, zero_shot), workers)
            mine = {str(p) for s in seeds for p in ctx.zoo(s).built}  # θ_base, when this process built it
            report["built"][0] = sorted(set(report["built"][0]) | mine)
            report["workers"] = workers
            return report
    rank, world = rank_and_world()
    start = time.perf_counter()
    if rank == 0:
        ctx.zoo(seeds[0]).base_hash()  # builds θ_base when missing; a usable one is not loaded
    barrier()  # θ_base exists before any other rank reads it
    _pending(ctx, domains, alphas, explain, variants, seeds)  # every refusal before any domain is written
    times: dict[str, float] = {"base": time.perf_counter() - start}
    accuracy: dict[str, float] = {}
    for name in claimed(domains, "zoo domains"):
        t0 = time.perf_counter()
        for seed in seeds:
            ctx.zoo(seed).build_domain(name, tuple(alphas), tuple(variants), explain)
        if zero_shot:
            accuracy[name] = ctx.zoo(seeds[0]).zero_shot_accuracy(name)
        times[name] = time.perf_counter() - t0
        release_freed_memory()
    built = sorted({str(p) for s in seeds for p in ctx.zoo(s).built})
    parts = gather_json({"seconds": times, "zero_shot_accuracy": accuracy, "built": built})  # also a barrier
    merged: dict[str, float] = {"base": parts[0]["seconds"]["base"]}
    for d in domains:  # the caller's order
        merged[d] = next(p["seconds"][d] for p in parts if d in p["seconds"])
    merged["total"] = time.perf_counter() - start
    acc = {d: next(p["zero_shot_accuracy"][d] for p in parts if d in p["zero_shot_accuracy"])
           for d in domains} if zero_shot else {}
    rank_of = {d: next(r for r, p in enumerate(parts) if d in p["seconds"]) for d in domains}
    return {"seconds": merged, "zero_shot_accuracy": acc, "rank_of": rank_of, "built": [p["built"] for p in parts]}


def _announce_first_build(ctx, domains: list[str], seeds: list[int]) -> None:
    """On a store without θ_base, say once (stderr, before the progress bars) what is built and that it takes long."""
    if not getattr(ctx, "progress", False) or rank_and_world()[0] != 0:
        return
    store = ctx.store
    if store.base_path().is_file():
        return
    cfg = ctx.zoo_config()
    if cfg.checkpoint or cfg.pretrained:
        base = "θ_base"
    elif ctx.zoo(seeds[0]).shipped_base() is not None:
        base = "θ_base (copied from the repository)"
    else:
        base = "θ_base by contrastive pretraining"
    print(f"tvdiag: first use of the store {store.folder}: building {base}, then θ_ft, φ and θ_ft* of "
          f"{len(domains)} domain(s) for seed(s) {', '.join(map(str, seeds))} — long on a CPU (the README gives "
          "measured times); an interrupted build resumes where it stopped", file=sys.stderr, flush=True)


def _pending(ctx, domains: Sequence[str], alphas, explain: bool, variants, seeds) -> list[str]:
    """Domains with something to train or explain for some seed (θ_base built first, in this process).

    Every domain and seed is planned (:meth:`train.zoo.build.Zoo.plan`), so a file the build may
    not replace is refused here, before any domain is written, in this process and on every rank.
    """
    return [d for d in domains
            if any([ctx.zoo(s).pending(d, tuple(alphas), tuple(variants), explain) for s in seeds])]


def build_curvatures(diag, targets: Sequence[str]) -> list[str]:
    """Hᵀ of ``targets`` in the store, each computed by the one rank that claims it; then a barrier.

    A no-op outside torch.distributed. Returns the targets this rank computed (or read from the cache).

    ``diag`` must be a non-data-parallel :class:`diag.features.pair_features.Diagnostics`: each rank
    computes its targets on all their images, the result a single process would get.
    """
    if not is_distributed():
        return []  # one process: the pairs build each target's Hᵀ when first needed
    mine = []
    for target in claimed(dict.fromkeys(targets), "target curvatures"):
        diag.curvature(target)
        mine.append(target)
        release_freed_memory()
    barrier()
    return mine
