"""Work split across ``torchrun`` ranks: zoo domains and the study's target curvatures.

Outside torch.distributed every function here runs the whole job in this process. Under
``torchrun`` (the process group is joined once, in :func:`diag.cli.main`):

* :func:`build_domains` — θ_base is built (or checked) by rank 0 alone while the others wait;
  then each stage of each domain (:data:`train.zoo.build.STAGES`: head and θ_ft, φ, θ_ft* of every
  α and variant), with all its seeds, is claimed by one free rank
  (:func:`~diag.runtime.distributed.claimed`, a dynamic queue, stage-major), which first waits for
  the domain's previous stage (:class:`~diag.runtime.distributed.DoneFlags`). Each artifact is
  written by exactly one process (atomically, :func:`train.tensorio.save_tensors`), and each stage
  seeds itself, so the bytes are those of one process. A final barrier means every rank may read
  every domain afterwards.
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

from diag.runtime.distributed import barrier, claimed, DoneFlags, gather_json, is_distributed, rank_and_world
from diag.runtime.workers import release_freed_memory, run_workers
from train.zoo.build import STAGES

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
        On every rank: ``{"seconds": {"base", <domain>..., "total"}, "zero_shot_accuracy": {domain: acc},
        "stage_ranks": {domain: {stage: rank}}, "built": [[paths written by rank r], ...],
        "idle_seconds": [per rank], "waited_seconds": [per rank]}``. Seconds of a domain are the wall
        times of its stages (:data:`train.zoo.build.STAGES`) over all seeds; a rank's idle seconds are the
        time from its first claim to the last rank's last task that it spent in no task (waiting for a
        prerequisite stage, ``waited_seconds``, or for the others at the end).
    """
    domains, seeds = list(dict.fromkeys(domains)), list(dict.fromkeys(seeds))
    _announce_first_build(ctx, domains, seeds)
    if not is_distributed() and getattr(ctx, "workers", 1) > 1:
        pending = _pending(ctx, domains, alphas, explain, variants, seeds)
        if len(pending) > 1:  # θ_base exists now (built with every thread); the domains go to the workers
            return _in_workers(ctx, min(ctx.workers, len(pending)),
                               (domains, alphas, explain, variants, seeds, zero_shot), seeds)
    rank, world = rank_and_world()
    start = time.perf_counter()
    if rank == 0:
        ctx.zoo(seeds[0]).base_hash()  # builds θ_base when missing; a usable one is not loaded
    barrier()  # θ_base exists before any other rank reads it
    _pending(ctx, domains, alphas, explain, variants, seeds)  # every refusal before any domain is written
    times: dict[str, float] = {"base": time.perf_counter() - start}
    accuracy: dict[str, float] = {}
    ranks: dict[str, dict[str, int]] = {}
    stages = STAGES if explain else STAGES[:1]
    # several ranks: stage-major, so the last domains' first stages start early and no rank idles at the end
    # while one works through a whole domain; one process: domain by domain
    tasks = [(d, st) for st in stages for d in domains] if world > 1 else [(d, st) for d in domains for st in stages]
    done = DoneFlags("zoo stages")
    loop_start, busy, waited = time.time(), 0.0, 0.0
    for name, stage in claimed(tasks, "zoo stages"):
        if stage != stages[0]:
            waited += done.wait(f"{name}/{stages[stages.index(stage) - 1]}")
        t0 = time.perf_counter()
        for seed in seeds:
            ctx.zoo(seed).build_stage(name, stage, tuple(alphas), tuple(variants))
        if zero_shot and stage == stages[0]:
            accuracy[name] = ctx.zoo(seeds[0]).zero_shot_accuracy(name)
        dt = time.perf_counter() - t0
        times[name], busy = times.get(name, 0.0) + dt, busy + dt
        ranks.setdefault(name, {})[stage] = rank
        done.set(f"{name}/{stage}")
        release_freed_memory()
    built = sorted({str(p) for s in seeds for p in ctx.zoo(s).built})
    parts = gather_json({"seconds": times, "zero_shot_accuracy": accuracy, "built": built, "ranks": ranks,
                         "loop": [loop_start, time.time()], "busy": busy, "waited": waited})  # also a barrier
    return _merged(parts, domains, zero_shot, time.perf_counter() - start)


def _in_workers(ctx, workers: int, args: tuple, seeds: Sequence[int]) -> dict:
    """:func:`build_domains` of ``args`` in ``workers`` local processes; their report (θ_base in rank 0's list
    when this process built it for one of ``seeds``), with a line on stderr of how busy the queue kept them."""
    report = run_workers(build_domains, ctx, args, workers)
    mine = {str(p) for s in seeds for p in ctx.zoo(s).built}  # θ_base, when this process built it
    report["built"][0] = sorted(set(report["built"][0]) | mine)
    report["workers"] = workers
    if ctx.progress:  # for a user deciding on --workers
        print(f"tvdiag: zoo stages done in {report['seconds']['total']:.0f} s by {workers} processes; idle "
              "per process: " + ", ".join(f"{s:.0f} s" for s in report["idle_seconds"]), file=sys.stderr, flush=True)
    return report


def _merged(parts: list[dict], domains: Sequence[str], zero_shot: bool, total: float) -> dict:
    """The ranks' reports of :func:`build_domains` as one (its Returns)."""
    merged: dict[str, float] = {"base": parts[0]["seconds"]["base"]}
    for d in domains:  # the caller's order; a domain's seconds: its stages' over the ranks that ran them
        merged[d] = sum(p["seconds"].get(d, 0.0) for p in parts)
    merged["total"] = total
    acc = {d: next(p["zero_shot_accuracy"][d] for p in parts if d in p["zero_shot_accuracy"])
           for d in domains} if zero_shot else {}
    stage_ranks = {d: {st: r for p in parts for st, r in p["ranks"].get(d, {}).items()} for d in domains}
    end = max(p["loop"][1] for p in parts)
    return {"seconds": merged, "zero_shot_accuracy": acc, "stage_ranks": stage_ranks,
            "built": [p["built"] for p in parts],
            "idle_seconds": [max(0.0, end - p["loop"][0] - p["busy"]) for p in parts],
            "waited_seconds": [p["waited"] for p in parts]}


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
        diag.forget(target)  # its operator's graph and the diagonal: the pairs read the files back
        release_freed_memory()
    barrier()
    return mine
