"""From stored uint8 images to model inputs, and batches over a split.

Images are stored as uint8 tensors ``(N, H, W, C)``, channels last, ``C`` in {1, 3}. A model
reads float32 ``(N, 3, H, W)``: ``x = (u / 255 - mean) / std`` per channel, grayscale repeated
to three channels.

This module depends on nothing in :mod:`train.datasets` (which imports it): a split is anything
with ``images`` and ``labels`` tensors (:class:`LabelledImages`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from train.errors import DataError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class LabelledImages(Protocol):
    """What batching needs of a split (e.g. :class:`train.datasets.Split`)."""

    images: torch.Tensor
    labels: torch.Tensor


def _check_nhwc(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = getattr(images, "dtype", type(images).__name__), tuple(getattr(images, "shape", ()))
        raise DataError(f"expected uint8 images of shape (N, H, W, C), got {got[0]} {got[1]}")
    if images.shape[-1] not in (1, 3):
        raise DataError(f"expected 1 or 3 channels last, got shape {tuple(images.shape)}")


def resize_float(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a float ``(N, C, H, W)`` batch to ``size``."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """Resize uint8 ``(N, H, W, C)`` images to ``(N, size, size, C)`` (bilinear, antialiased).

    Computed in float32 in chunks of ``chunk`` images, rounded and clipped back to 0..255.
    """
    _check_nhwc(images)
    if tuple(images.shape[1:3]) == (size, size):
        return images
    out = torch.empty((images.shape[0], size, size, images.shape[3]), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].permute(0, 3, 1, 2).float()
        y = resize_float(x, size).round_().clamp_(0, 255)
        out[i : i + chunk] = y.permute(0, 2, 3, 1).to(torch.uint8)
    return out


def to_model_input(
    images: torch.Tensor,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Turn stored uint8 images into normalised float32 model input.

    ``x[n, c] = (resize(u[n, ..., c] / 255) - mean[c]) / std[c]``, with grayscale repeated to
    three channels and ``resize`` bilinear and antialiased (skipped when ``size`` is None or
    already matches).

    Args:
        images: uint8 ``(N, H, W, C)``, ``C`` in {1, 3}.
        mean: Per-channel mean (CLIP's by default).
        std: Per-channel standard deviation (CLIP's by default).
        size: Optional output side (int) or ``(H, W)``.

    Returns:
        float32 ``(N, 3, H', W')`` on the device of ``images``.

    Raises:
        DataError: ``images`` is not uint8 ``(N, H, W, C)`` with one or three channels.

    >>> u = torch.full((1, 2, 2, 1), 255, dtype=torch.uint8)
    >>> to_model_input(u, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))[0, :, 0, 0].tolist()
    [1.0, 1.0, 1.0]
    """
    _check_nhwc(images)
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None:
        x = resize_float(x, size)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def iterate_batches(
    split_or_tensors: LabelledImages | tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_uint8, y)`` batches over a split, the last batch possibly smaller.

    Args:
        split_or_tensors: A split (``.images``, ``.labels``) or a pair ``(images, labels)``.
        batch_size: Images per batch (>= 1).
        shuffle: Visit the images in the order of ``torch.randperm(N, generator=generator)``.
        generator: Source of randomness for ``shuffle`` (seeded for reproducible orders).

    Yields:
        ``(images[idx], labels[idx])`` for consecutive index blocks of size ``batch_size``.

    Raises:
        DataError: ``batch_size < 1`` or images and labels differ in length.
    """
    if isinstance(split_or_tensors, tuple):
        images, labels = split_or_tensors
    else:
        images, labels = split_or_tensors.images, split_or_tensors.labels
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    if labels.shape[0] != n:
        raise DataError(f"{n} images but {labels.shape[0]} labels")
    if shuffle:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield images[idx], labels[idx]
    else:
        for i in range(0, n, batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
