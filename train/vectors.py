"""Task vectors: small typed value objects with arithmetic, base checks and safetensors storage.

τ = θ − θ_base lives in the key space of the vision tower (``visual.*`` names). Vectors know
the hash of the base weights they were taken from; arithmetic or application across bases
or shapes raises :class:`~train.errors.BaseMismatchError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from train.errors import ArtifactError, BaseMismatchError, TvdiagError
from train.tensorio import load_tensors, save_tensors


@dataclass(frozen=True, eq=False)
class TaskVector:
    """τ as a name → tensor mapping tied to the base weights it was taken from.

    >>> a = TaskVector({"w": torch.ones(2)}, base_hash="b0")
    >>> (2 * a - a).tensors["w"].tolist()
    [1.0, 1.0]
    """

    tensors: Mapping[str, torch.Tensor]
    base_hash: str
    provenance: Mapping[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------- checks
    def _compatible(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"Cannot combine a TaskVector with {type(other).__name__}")
        if other.base_hash != self.base_hash:
            raise BaseMismatchError(
                f"Task vectors of different bases: {self.base_hash} vs {other.base_hash}")
        if self.tensors.keys() != other.tensors.keys():
            diff = sorted(set(self.tensors) ^ set(other.tensors))
            raise BaseMismatchError(f"Task vectors have different parameters, e.g. {diff[:3]}")
        for key, value in self.tensors.items():
            if value.shape != other.tensors[key].shape:
                raise BaseMismatchError(
                    f"Shape mismatch for '{key}': {tuple(value.shape)} vs {tuple(other.tensors[key].shape)}")

    def _derived(self, tensors: dict[str, torch.Tensor], op: str) -> "TaskVector":
        return TaskVector(tensors, self.base_hash, {"derived": op})

    # ------------------------------------------------------------- arithmetic
    def __add__(self, other: "TaskVector") -> "TaskVector":
        self._compatible(other)
        return self._derived({k: v + other.tensors[k] for k, v in self.tensors.items()}, "sum")

    def __radd__(self, other) -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:  # support sum([...])
            return self
        return self.__add__(other)

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self._compatible(other)
        return self._derived({k: v - other.tensors[k] for k, v in self.tensors.items()}, "difference")

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __mul__(self, scale: float) -> "TaskVector":
        if not isinstance(scale, (int, float)):
            raise TypeError(f"A TaskVector scales by a number, not {type(scale).__name__}")
        return self._derived({k: v * float(scale) for k, v in self.tensors.items()}, f"scaled {scale}")

    __rmul__ = __mul__

    # ------------------------------------------------------------ quantities
    def norm(self) -> float:
        """‖τ‖₂ accumulated in float64."""
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.tensors.values()))

    def tensor_norms(self) -> dict[str, float]:
        return {k: float(v.double().norm()) for k, v in self.tensors.items()}

    def dot(self, other: "TaskVector") -> float:
        self._compatible(other)
        return sum(float((v.double() * other.tensors[k].double()).sum()) for k, v in self.tensors.items())

    def cosine(self, other: "TaskVector") -> float:
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else float("nan")

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.tensors.values())

    # ----------------------------------------------------------- application
    def apply_to(self, base: Mapping[str, torch.Tensor], scale: float = 1.0,
                 base_hash: str | None = None) -> dict[str, torch.Tensor]:
        """θ = θ_base + scale·τ, returned as a new state dict.

        Args:
            base: the base state (``visual.*`` keys); extra keys are copied unchanged.
            base_hash: hash of ``base``; refused when it differs from the vector's.
        """
        if base_hash is not None and base_hash != self.base_hash:
            raise BaseMismatchError(f"Vector of base {self.base_hash} cannot be applied to base {base_hash}")
        missing = [k for k in self.tensors if k not in base]
        if missing:
            raise BaseMismatchError(f"Base has no parameter '{missing[0]}' ({len(missing)} missing)")
        out = dict(base)
        for key, value in self.tensors.items():
            if base[key].shape != value.shape:
                raise BaseMismatchError(
                    f"Shape mismatch for '{key}': base {tuple(base[key].shape)} vs vector {tuple(value.shape)}")
            out[key] = base[key] + scale * value.to(base[key].dtype)
        return out

    @classmethod
    def between(cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], base_hash: str,
                provenance: Mapping[str, str] | None = None) -> "TaskVector":
        """τ = θ_finetuned − θ_base over the keys of ``finetuned``."""
        return cls({k: (v.detach().float() - base[k].detach().float()) for k, v in finetuned.items()},
                   base_hash, dict(provenance or {}))

    def random_like(self, seed: int = 0) -> "TaskVector":
        """A Gaussian random vector with the same per-tensor norms (a control for transfer)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for key, value in self.tensors.items():
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
            norm = noise.norm()
            out[key] = (noise * (value.double().norm() / norm if norm > 0 else 0.0)).to(value.dtype)
        return TaskVector(out, self.base_hash, {"derived": f"random, norms of τ, seed {seed}"})

    # ---------------------------------------------------------------- storage
    def save(self, path: str | Path) -> Path:
        meta = {**{k: str(v) for k, v in self.provenance.items()}, "base_hash": self.base_hash, "kind": "task_vector"}
        return save_tensors(path, self.tensors, meta)

    @classmethod
    def load(cls, path: str | Path, expect_base: str | None = None) -> "TaskVector":
        """Load a vector; refuses pickles, corrupt files, NaN/Inf and (with ``expect_base``) other bases."""
        tensors, meta = load_tensors(path)
        if "base_hash" not in meta:
            raise ArtifactError(f"{path} is not a tvdiag task vector (no base_hash in its metadata)")
        if expect_base is not None and meta["base_hash"] != expect_base:
            raise BaseMismatchError(f"{path} was taken from base {meta['base_hash']}, expected {expect_base}")
        return cls(tensors, meta.pop("base_hash"), meta)

    def __repr__(self) -> str:
        return (f"TaskVector(n_tensors={len(self.tensors)}, n_params={self.num_params}, "
                f"norm={self.norm():.4g}, base={self.base_hash})")


def check_scale(name: str, value: float) -> float:
    """Validate a finite λ."""
    if not math.isfinite(float(value)):
        raise TvdiagError(f"{name} must be finite, got {value}")
    return float(value)
