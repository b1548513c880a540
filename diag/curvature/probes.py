"""Rademacher probe streams and the helpers every estimator shares.

Probe ``i`` of a run with seed ``s`` is drawn on the CPU from its own generator seeded
with :func:`probe_seed` ``(s, i)``, so a run is reproducible, can stop and resume
anywhere and can be split across processes.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from diag.curvature.operators import _ModelOperator
from diag.runtime.distributed import is_distributed, rank_and_world

__all__ = ["probe_block", "probe_seed", "rademacher"]

_MASK64 = (1 << 64) - 1


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


def probe_block(dim: int, seed: int, indices, dtype: torch.dtype = torch.float64,
                device: torch.device | str = "cpu") -> Tensor:
    """Probes ``indices`` of stream ``seed`` as the columns of a ``(dim, len(indices))`` block on ``device``."""
    return torch.stack([rademacher(dim, seed, i, dtype, "cpu") for i in indices], dim=1).to(device)



#: Share of the free memory (RAM on a CPU, the device's on a GPU) an estimator's buffers may take
#: (Lanczos' kept products, Hutch++'s sketch and blocks).
MEMORY_SHARE = 0.5


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory where tensors of ``device`` live: the GPU's free bytes, else the host's
    ``MemAvailable`` (Linux; without ``/proc/meminfo`` the total from ``sysconf``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


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

