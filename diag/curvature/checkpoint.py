"""Resumable running sums of the probe estimators, stored as safetensors.

A long Hutchinson run writes its state every ``every`` probes: the number of probes
done, the per-probe totals ``vᵢᵀ A vᵢ`` (float64, probe order), the Welford mean and
sum of squared deviations ``M2`` of those totals and, for the diagonal, of the vectors
``vᵢ ⊙ A vᵢ`` (two ``(D,)`` vectors, whatever the number of probes) and the per-probe
scalars ``(vᵢ ⊙ A vᵢ)ᵀ w_j`` of the requested functionals ``w_j`` (``(n, m)``). No state
holds one ``(D,)`` vector per probe. Since probe ``i`` is drawn from its own generator seeded by
``(seed, i)``, a run resumed from a state after ``n`` probes continues with probe
``n`` and ends with bit-for-bit the same result as an uninterrupted run.

Files are written to a temporary name in the same folder and moved into place with
:func:`os.replace`, so a run killed while writing leaves the previous state intact.
The metadata (estimator kind, seed, D, dtype, block size, world size) must match on
resume; otherwise :class:`~train.errors.ArtifactError` is raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from train.errors import ArtifactError, StoreError
from train.tensorio import atomic_write_bytes

__all__ = ["ProbeCheckpoint", "ProbeState", "load_state", "save_state"]

FORMAT = "tvdiag-probe-state-1"


@dataclass(frozen=True)
class ProbeCheckpoint:
    """Where and how often a probe loop saves its running sums.

    Attributes:
        path: The safetensors file (created with its folder if missing).
        every: Save after at least this many new probes (and always at the end).
    """

    path: Path
    every: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.every < 1:
            raise ValueError(f"checkpoint every={self.every}; must be >= 1")

    @classmethod
    def coerce(cls, c: ProbeCheckpoint | str | os.PathLike | None) -> ProbeCheckpoint | None:
        """Accept a :class:`ProbeCheckpoint`, a path or ``None``."""
        if c is None or isinstance(c, ProbeCheckpoint):
            return c
        return cls(Path(c))


@dataclass
class ProbeState:
    """Running sums of a probe loop (float64, on CPU).

    Attributes:
        n: Probes done (the next probe index).
        values: ``(n,)`` per-probe totals ``vᵢᵀ A vᵢ``.
        mean, m2: Welford mean and sum of squared deviations of ``values``.
        vec_mean, vec_m2: Same for the vectors ``vᵢ ⊙ A vᵢ`` (diagonal only), ``(D,)``.
        fvalues: ``(n, m)`` per-probe functionals ``(vᵢ ⊙ A vᵢ)ᵀ w_j`` (diagonal with
            functionals only, else None).
    """

    n: int
    values: Tensor
    mean: float
    m2: float
    vec_mean: Tensor | None = None
    vec_m2: Tensor | None = None
    fvalues: Tensor | None = None

    @classmethod
    def empty(cls, dim: int | None, functionals: int = 0) -> ProbeState:
        """State before the first probe; ``dim`` given for the diagonal, ``functionals`` (m > 0) with it."""
        z = torch.zeros(0, dtype=torch.float64)
        if dim is None:
            return cls(0, z, 0.0, 0.0)
        fv = torch.zeros(0, functionals, dtype=torch.float64) if functionals else None
        return cls(0, z, 0.0, 0.0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), fv)


def save_state(path: str | os.PathLike, state: ProbeState, meta: dict[str, str]) -> None:
    """Write ``state`` and ``meta`` atomically to ``path`` (safetensors).

    Raises:
        ArtifactError: the folder cannot be created or written.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors = {
        "n": torch.tensor([state.n], dtype=torch.int64),
        "values": state.values.detach().to("cpu", torch.float64).contiguous(),
        "mean": torch.tensor([state.mean], dtype=torch.float64),
        "m2": torch.tensor([state.m2], dtype=torch.float64),
    }
    if state.vec_mean is not None:
        tensors["vec_mean"] = state.vec_mean.detach().to("cpu", torch.float64).contiguous()
        tensors["vec_m2"] = state.vec_m2.detach().to("cpu", torch.float64).contiguous()
    if state.fvalues is not None:
        tensors["fvalues"] = state.fvalues.detach().to("cpu", torch.float64).contiguous()
    metadata = {"format": FORMAT, **{k: str(v) for k, v in meta.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_bytes(path, save(tensors, metadata=metadata))
    except StoreError as e:
        raise ArtifactError(f"Cannot write probe checkpoint '{path}': {e}") from e


def load_state(path: str | os.PathLike, meta: dict[str, str]) -> ProbeState | None:
    """Read a state written by :func:`save_state`; ``None`` if ``path`` does not exist.

    Args:
        path: The checkpoint file.
        meta: The metadata the current run would write; every key must match.

    Raises:
        ArtifactError: unreadable file, wrong format, or metadata that differs (another
            seed, operator size, block size, world size or estimator).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"Cannot read probe checkpoint '{path}': {e}") from e
    if stored.get("format") != FORMAT:
        raise ArtifactError(f"'{path}' is not a probe checkpoint (format {stored.get('format')!r}, expected {FORMAT!r}).")
    for k, v in meta.items():
        if stored.get(k) != str(v):
            raise ArtifactError(f"Probe checkpoint '{path}' was written with {k}={stored.get(k)!r}, "
                                f"this run has {k}={v!r}; delete it or use the same settings.")
    try:
        n = int(t["n"][0])
        values = t["values"]
        if values.shape[0] != n:
            raise ArtifactError(f"Probe checkpoint '{path}' is inconsistent: n={n} but {values.shape[0]} values.")
        vec_mean, vec_m2, fvalues = t.get("vec_mean"), t.get("vec_m2"), t.get("fvalues")
        if fvalues is not None and fvalues.shape[0] != n:
            raise ArtifactError(f"Probe checkpoint '{path}' is inconsistent: n={n} but {fvalues.shape[0]} functionals.")
        if not all(x is None or torch.isfinite(x).all() for x in (values, vec_mean, fvalues)):
            raise ArtifactError(f"Probe checkpoint '{path}' holds NaN/Inf values.")
        return ProbeState(n, values, float(t["mean"][0]), float(t["m2"][0]), vec_mean, vec_m2, fvalues)
    except KeyError as e:
        raise ArtifactError(f"Probe checkpoint '{path}' lacks tensor {e}.") from e
