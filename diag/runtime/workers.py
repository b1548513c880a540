"""Local worker processes for the long builds on a multi-core CPU (``--workers``).

On a CPU, one process with ``c`` threads uses the cores poorly on the tiny backbone (its
matrices are small), while ``c`` single-threaded processes on different domains keep every
core busy. So when the zoo or the study has work left and ``--workers`` is above 1, the
command spawns that many processes, joins them in a gloo group (a file rendezvous in a
temporary folder: no port, nothing leaves the machine) and runs the same sharded code as
under ``torchrun`` (:mod:`diag.runtime.shards`, :func:`diag.study.run.run_study`): each stage of a
domain (θ_ft, φ, θ_ft*), target curvature and pair is computed by one process, exactly as one process
with the same thread count would. The parent then reads everything from the store. θ_base is copied
from the repository (or pretrained) before the split, in the parent, with all its threads.

``auto`` is this process's thread count (the cores, or ``OMP_NUM_THREADS``; at most
:data:`MAX_AUTO_WORKERS`) on a CPU and 1 on CUDA or MPS, where processes would share one
device. The workers share this process's threads: each runs ``threads // workers``.
Only worker 0 shows progress bars (of its own share of the work).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import tempfile
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from diag.runtime.distributed import process_group
from train.errors import TvdiagError

__all__ = ["MAX_AUTO_WORKERS", "STOP_GRACE_S", "parse_workers", "resolve_workers", "run_workers"]

#: ``--workers auto`` never starts more processes than this (memory: each holds its models and data).
MAX_AUTO_WORKERS = 4

#: Seconds the other workers get to exit by themselves after one failed, before they are terminated.
STOP_GRACE_S = 30.0


def parse_workers(text: str) -> int | None:
    """``--workers`` value: ``auto`` (None) or a positive count."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise TvdiagError(f"--workers must be 'auto' or a positive integer, got {text!r}")
    return value


def resolve_workers(workers: int | None, device) -> int:
    """The worker count of ``--workers`` (None = ``auto``) on ``device`` (a :class:`torch.device`).

    ``auto``: 1 on CUDA or MPS; on a CPU one per thread this process may use (``torch`` 's
    intra-op threads, which follow ``OMP_NUM_THREADS`` and the cores), at most :data:`MAX_AUTO_WORKERS`.
    """
    if workers is not None:
        return workers
    if getattr(device, "type", "cpu") != "cpu":
        return 1
    import torch

    return max(1, min(torch.get_num_threads(), MAX_AUTO_WORKERS))


def run_workers(fn: Callable[..., Any], ctx, args: tuple, workers: int) -> Any:
    """Run ``fn(ctx, *args)`` in ``workers`` spawned processes of one gloo group; worker 0's result.

    ``fn`` must be a module-level function whose result is JSON-serialisable (worker 0's is
    returned). Each worker gets a copy of the context with one process's share of the threads,
    progress bars on worker 0 only, and ``workers = 1`` (no nesting). The workers' warnings are
    raised again here, each distinct message once.

    Raises:
        TvdiagError: a worker failed with a tvdiag error (its message), or any other failure
            (its exception type and message; the traceback went to stderr).
    """
    import torch
    import torch.multiprocessing as mp

    threads = max(1, torch.get_num_threads() // workers)
    with tempfile.TemporaryDirectory(prefix="tvdiag-workers-") as tmp:
        try:
            context = mp.spawn(_entry, args=(workers, threads, tmp, fn, replace(ctx, workers=1), args),
                               nprocs=workers, join=False)
            # a failed worker leaves the group at once; its peers' collectives then fail and they exit
            # on their own within the grace period (only a peer stuck elsewhere is stopped by a signal)
            while not context.join(grace_period=STOP_GRACE_S):
                pass
        except mp.ProcessRaisedException as err:
            messages = sorted(Path(tmp).glob("error-*.txt"))
            if messages:
                raise TvdiagError(messages[0].read_text()) from None
            raise TvdiagError(f"a worker process failed: {str(err).strip().splitlines()[-1]}") from None
        except mp.ProcessExitedException as err:
            raise TvdiagError(f"a worker process died ({err}); rerun with --workers 1 to see it in this process") \
                from None
        seen: list[str] = []
        for path in sorted(Path(tmp).glob("warnings-*.json")):  # once each, in this process (the CLI prints them)
            seen += [m for m in json.loads(path.read_text()) if m not in seen]
        for message in seen:
            warnings.warn(message, stacklevel=2)
        result = Path(tmp) / "result.json"
        return json.loads(result.read_text()) if result.is_file() else None


def _entry(rank: int, world: int, threads: int, tmp: str, fn: Callable[..., Any], ctx, args: tuple) -> None:
    """One worker: threads, the gloo group, ``fn``; worker 0 writes the result, a failing worker its message.

    The group is left through :func:`diag.runtime.distributed.process_group`: a barrier when
    every rank succeeded, none when this one failed (the parent then stops the others, and the
    message it reports is the failing worker's own).
    """
    import torch


    torch.set_num_threads(threads)
    with process_group(f"file://{tmp}/rendezvous", rank=rank, world_size=world, backend="gloo",
                       timeout=timedelta(hours=12)):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                result = fn(replace(ctx, progress=ctx.progress and rank == 0), *args)
            (Path(tmp) / f"warnings-{rank}.json").write_text(json.dumps([str(w.message) for w in caught]))
            if rank == 0:
                (Path(tmp) / "result.json").write_text(json.dumps(result))
        except TvdiagError as err:
            (Path(tmp) / f"error-{rank}.txt").write_text(str(err))
            raise


def release_freed_memory() -> None:
    """Hand the heap pages freed by a finished task back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A long run of tasks (study pairs, zoo domains) frees big tensors into glibc's heap, which keeps
    them; trimming after each task held a one-process study of the 42 pairs at 1.6 GB instead of 2.4 GB
    (with :data:`diag.features.pair_features.MAX_OPERATORS`). Numbers are unchanged: only free pages go.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()

