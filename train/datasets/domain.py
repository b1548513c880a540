"""Value objects of the dataset layer: a :class:`Split` (uint8 images and labels) and a
:class:`Domain` (named splits, class names, prompt templates, content hash)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from train.errors import DataError


@dataclass(frozen=True, repr=False)
class Split:
    """Images and labels of one split.

    Attributes:
        images: uint8 ``(N, H, W, C)``, channels last, ``C`` in {1, 3}.
        labels: int64 ``(N,)``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"images must be uint8 (N, H, W, C) with C in {{1, 3}}, got {x.dtype} {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.ndim != 1:
            raise DataError(f"labels must be int64 (N,), got {y.dtype} {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{x.shape[0]} images but {y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> Split:
        """The images at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """Images per class, ``bincount(labels, minlength=num_classes)``."""
        return torch.bincount(self.labels, minlength=num_classes)

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, image_shape={self.image_shape})"


@dataclass(frozen=True, repr=False)
class Domain:
    """A classification domain: images per split, class names and CLIP prompt templates.

    Attributes:
        name: Registry name (``"mnist"``) or the folder's basename for an ImageFolder.
        classnames: Readable class names in label order.
        templates: Format strings with ``{c}``, e.g. ``"a photo of a {c}."``.
        splits: ``"train"``, ``"test"``, ``"val"`` (carved from the source's train split, see
            :func:`~train.datasets.carve_validation`) and, for the mini-suite, ``"pool"``.
        content_hash: sha256 (hex) of the source: the npz file for the mini-suite; for a folder,
            sha256 over the sorted lines ``relative/path\\0sha256(file bytes)\\n`` of the files
            loaded (every file of the folder unless ``max_per_split`` left some out).
        source: ``"minisuite"``, ``"torchvision:<root>"`` or ``"imagefolder:<path>"``.
        split_key: ``""`` when the splits are the source's own with ``val`` carved by labels alone
            (the stratified carve); else the sha256 of the carve that made them (the near-duplicate
            grouped carve where it moved images, :func:`~train.datasets.carve_validation`).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    splits: dict[str, Split]
    content_hash: str
    source: str
    split_key: str = ""

    @property
    def data_key(self) -> str:
        """What an artifact built from these splits is keyed by: ``content_hash`` for the stratified
        carve (the key every artifact had before grouped carves existed), else
        ``sha256(content_hash + "|" + split_key)``, so a changed split is never read as the old one."""
        if not self.split_key:
            return self.content_hash
        return hashlib.sha256(f"{self.content_hash}|{self.split_key}".encode()).hexdigest()

    @property
    def num_classes(self) -> int:
        """Number of classes ``K``; labels lie in ``[0, K)``."""
        return len(self.classnames)

    def split(self, name: str) -> Split:
        """The split called ``name``.

        Raises:
            DataError: This domain has no such split; the message lists the ones it has.
        """
        if name not in self.splits:
            have = ", ".join(self.splits)
            raise DataError(f"{self.name}: no split '{name}'. Available: {have}")
        return self.splits[name]

    def to_dict(self) -> dict:
        """A flat summary (no tensors) for logs and provenance."""
        any_split = next(iter(self.splits.values()))
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "source": self.source,
            "content_hash": self.content_hash,
            "split_key": self.split_key,
            "image_shape": list(any_split.image_shape),
            "splits": {k: len(v) for k, v in self.splits.items()},
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        shape = next(iter(self.splits.values())).image_shape
        return (
            f"Domain(name={self.name!r}, num_classes={self.num_classes}, splits=({sizes}), "
            f"image_shape={shape}, source={self.source!r}, content_hash={self.content_hash[:12]}…)"
        )

