"""Small ``torch.distributed`` helpers for data-parallel curvature products.

Every rank computes a partial *sum* over its own batches (products and sample
counts); :func:`all_reduce_sum` adds them so that all ranks hold the same total,
and the caller divides by the total count. Backends: gloo on CPU, nccl on GPU
(nccl needs CUDA tensors; :func:`all_reduce_sum` moves them when necessary).
:func:`barrier` and :func:`gather_json` coordinate work sharded by rank (zoo domains,
study pairs; :mod:`diag.shards`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_tensor", "all_reduce_sum", "barrier", "broadcast", "default_backend", "gather_json",
           "is_distributed", "rank_and_world", "shard_batches"]

T = TypeVar("T")


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


def all_gather_tensor(t: Tensor) -> list[Tensor]:
    """``t`` of every rank (same shape and dtype on all), indexed by rank, on ``t``'s device."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [t]
    dev = _comm_device()
    buf = t.contiguous() if dev is None else t.to(dev)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return [o.to(t.device) for o in out]


def default_backend(device: torch.device | str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


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


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Copy ``t`` from rank ``src`` to every rank; returns the received tensor."""
    if not is_distributed() or dist.get_world_size() == 1:
        return t
    dev = _comm_device()
    buf = t.clone().contiguous() if dev is None else t.to(dev).clone()
    dist.broadcast(buf, src=src)
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
