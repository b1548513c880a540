"""Small ``torch.distributed`` helpers for data-parallel curvature products.

Every rank computes a partial *sum* over its own batches (products and sample
counts); :func:`all_reduce_sum` adds them so that all ranks hold the same total,
and the caller divides by the total count. Backends: gloo on CPU, nccl on GPU
(nccl needs CUDA tensors; :func:`all_reduce_sum` moves them when necessary).
:func:`barrier` and :func:`gather_json` coordinate work sharded by rank (zoo domains,
study pairs; :mod:`diag.runtime.shards`); :func:`claimed` hands tasks out dynamically.

Every process joins and leaves its group through :func:`process_group` (or the pair
:func:`init_group` / :func:`close_group`): the ``torchrun`` path of the CLI, the local
``--workers`` and the multi-process tests alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import itertools
import time

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_tensor", "all_reduce_sum", "barrier", "claimed", "close_group", "DoneFlags", "gather_json",
           "init_group", "is_distributed", "process_group", "rank_and_world", "shard_batches"]

T = TypeVar("T")

#: Numbers each :func:`claimed` queue of this process; every rank makes its queues in the same order.
_QUEUE_IDS = itertools.count()

#: How long a rank waits at the closing barrier for its peers by default (they may still be computing).
CLOSE_TIMEOUT = timedelta(hours=12)


def init_group(init_method: str = "env://", *, rank: int | None = None, world_size: int | None = None,
               backend: str | None = None, timeout: timedelta | None = None) -> None:
    """Join the default process group: the one place a tvdiag process does.

    Args:
        init_method: ``env://`` under ``torchrun`` (rank and world from the environment), or
            ``file://<path>`` for processes spawned on one machine (no port is opened).
        rank, world_size: this process's rank and the group's size (``file://`` needs both).
        backend: ``gloo`` or ``nccl``; default nccl when CUDA is available, else gloo.
        timeout: how long a collective may wait for a peer (torch's default when None).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    if rank is not None:
        kwargs.update(rank=rank, world_size=world_size)
    dist.init_process_group(backend, init_method=init_method, **kwargs)


def close_group(ok: bool, timeout: timedelta = CLOSE_TIMEOUT) -> None:
    """Leave the default process group: on the healthy path wait for every rank, then destroy it.

    Why the barrier: gloo's ``destroy_process_group`` shuts this rank's transport down at once,
    and a peer that is still inside (or just leaving) a collective with it then loses the
    connection in gloo's background thread, where the error cannot reach Python and the C++
    runtime calls ``std::terminate`` (SIGABRT, "terminate called without an active
    exception"); after a barrier that every rank has left, no message is in flight.

    Args:
        ok: True when this rank finished its work: it waits for the others at a barrier (gloo's
            ``monitored_barrier``, which names a rank that never arrives) before destroying. False
            on the error path: destroy at once, so that a failed rank never waits on peers that
            may wait on it (the launcher stops them; their own error is the one reported).
        timeout: the longest wait at the barrier (peers may have more work left than this rank).

    Raises:
        RuntimeError: a peer failed or left before the barrier (only when ``ok``); the group is
            destroyed all the same.
    """
    if not is_distributed():
        return
    try:
        if ok and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
            else:
                dist.barrier()
    finally:
        dist.destroy_process_group()


@contextmanager
def process_group(init_method: str = "env://", *, rank: int | None = None, world_size: int | None = None,
                  backend: str | None = None, timeout: timedelta | None = None,
                  close_timeout: timedelta = CLOSE_TIMEOUT):
    """:func:`init_group` on entry, :func:`close_group` on exit (``ok`` unless the body raised)."""
    init_group(init_method, rank=rank, world_size=world_size, backend=backend, timeout=timeout)
    ok = False
    try:
        yield
        ok = True
    finally:
        close_group(ok, close_timeout)


def is_distributed() -> bool:
    """True when a default process group is initialised (and has more than zero ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (no-op outside torch.distributed)."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.barrier()


def gather_json(obj):
    """Every rank's ``obj`` (JSON-serialisable: names, numbers, lists, dicts), indexed by rank, on every rank.

    ``[obj]`` outside torch.distributed. Sent as UTF-8 JSON in a byte tensor (no pickling, unlike
    ``all_gather_object``): lengths are gathered first, then the zero-padded payloads.
    """
    import json

    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    world = dist.get_world_size()
    n = all_gather_tensor(torch.tensor([payload.numel()], dtype=torch.int64))
    width = int(max(int(x) for x in n)) or 1
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[:payload.numel()] = payload
    rows = all_gather_tensor(padded)
    return [json.loads(bytes(rows[r][:int(n[r])].tolist()).decode()) for r in range(world)]


def claimed(tasks: Iterable[T], name: str) -> Iterator[T]:
    """The tasks this rank takes, one at a time, from a queue every rank shares: a free rank claims the
    next task, so a rank whose tasks were short starts another instead of waiting at the next barrier.

    The queue is a counter in the process group's key-value store (``torchrun``'s TCP store, the
    ``--workers`` file store): ``add`` is atomic, so each task goes to exactly one rank. Which rank
    computes a task does not change its result (each is computed whole by one process with the
    same thread count). Every rank must create its queues in the same order (``name`` only labels
    them). Outside torch.distributed, every task in order.
    """
    tasks = list(tasks)
    if not is_distributed() or dist.get_world_size() == 1:
        yield from tasks
        return
    # the default group's store: no public accessor; it is the rendezvous store every rank already shares
    store = dist.distributed_c10d._get_default_store()
    key = f"tvdiag/queue/{next(_QUEUE_IDS)}/{name}"
    while (i := store.add(key, 1) - 1) < len(tasks):
        yield tasks[i]


class DoneFlags:
    """Flags of finished tasks every rank can see (the same key-value store as :func:`claimed`): a rank that
    claimed a task whose prerequisite another rank is still computing waits for that one flag instead of a
    barrier. Made by every rank in the same order as its queues; outside torch.distributed a no-op (one
    process runs its tasks in order, prerequisites first).
    """

    def __init__(self, name: str) -> None:
        self.prefix = f"tvdiag/done/{next(_QUEUE_IDS)}/{name}/"
        self.store = (dist.distributed_c10d._get_default_store()
                      if is_distributed() and dist.get_world_size() > 1 else None)

    def set(self, task: str) -> None:
        """Flag ``task`` as finished."""
        if self.store is not None:
            self.store.set(self.prefix + task, "1")

    def wait(self, task: str) -> float:
        """Wait until ``task`` is flagged; the seconds waited."""
        if self.store is None:
            return 0.0
        t0 = time.perf_counter()
        self.store.wait([self.prefix + task], CLOSE_TIMEOUT)
        return time.perf_counter() - t0


def all_gather_tensor(t: Tensor) -> list[Tensor]:
    """``t`` of every rank (same shape and dtype on all), indexed by rank, on ``t``'s device."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [t]
    dev = _comm_device()
    buf = t.contiguous() if dev is None else t.to(dev)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return [o.to(t.device) for o in out]


def _comm_device() -> torch.device | None:
    """The device a collective needs its tensors on (CUDA for nccl), or None."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks; returns the summed tensor (on ``t``'s device).

    Outside torch.distributed this returns ``t`` unchanged.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return t
    dev = _comm_device()
    buf = t.contiguous() if dev is None or t.device == dev else t.to(dev)
    if buf is t:
        buf = t.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def shard_batches(batches: Iterable[T], rank: int | None = None, world_size: int | None = None) -> Iterator[T]:
    """Yield every ``world_size``-th batch starting at ``rank`` (round-robin sharding).

    The shards of all ranks together are exactly the original batches, each once.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    for i, b in enumerate(batches):
        if i % world_size == rank:
            yield b
