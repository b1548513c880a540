"""Patch masks -> masked images, and the value function of a patch coalition.

Patches are numbered row-major over the ``gh x gw`` grid of ``patch_size`` squares,
the order in which a ViT flattens its patch tokens (``conv1`` output ``(B, W, gh, gw)``
reshaped to ``(B, gh*gw, W)``), so patch ``m`` covers rows ``(m // gw) * p ...`` and
columns ``(m % gw) * p ...``.

A coalition ``S`` of patches is a boolean vector ``z`` of length ``M = gh * gw``; its
masked image is ``x_S = z_up * x + (1 - z_up) * baseline`` with ``z_up`` the mask
upsampled to pixels. The value function of an image ``x`` and target class ``c`` is

    v(S) = f(x_S)_c                       (output = "logit")
    v(S) = softmax(f(x_S))_c              (output = "prob")
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from train.errors import TvdiagError, unknown

OUTPUTS = ("logit", "prob")

__all__ = [
    "OUTPUTS",
    "patch_grid",
    "upsample_patch_mask",
    "apply_patch_mask",
    "patch_means",
    "coalition_values",
]


def patch_grid(images: Tensor, patch_size: int) -> tuple[int, int]:
    """Grid ``(gh, gw)`` of ``patch_size`` squares that tile ``images`` (B, 3, H, W).

    Raises:
        TvdiagError: ``images`` is not 4-d or H, W are not multiples of ``patch_size``.
    """
    if images.dim() != 4:
        raise TvdiagError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise TvdiagError(f"patch_size must be a positive int, got {patch_size!r}")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise TvdiagError(f"image size {h}x{w} is not a multiple of patch_size {patch_size}")
    return h // patch_size, w // patch_size


def upsample_patch_mask(masks: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Upsample patch masks (N, M) to pixel masks (N, 1, gh*p, gw*p) (a view-free expand).

    Pixel ``(r, c)`` takes the value of patch ``(r // p) * gw + c // p``.
    """
    gh, gw = grid
    n = masks.shape[0]
    p = patch_size
    up = masks.reshape(n, gh, 1, gw, 1).expand(n, gh, p, gw, p)
    return up.reshape(n, 1, gh * p, gw * p)


def _check_baseline(baseline: float | Tensor, images: Tensor) -> Tensor:
    """Baseline as a tensor broadcastable to ``images`` (B, C, H, W), same dtype/device."""
    base = torch.as_tensor(baseline, dtype=images.dtype, device=images.device)
    try:
        torch.broadcast_shapes(base.shape, images.shape)
    except RuntimeError:
        raise TvdiagError(
            f"baseline of shape {tuple(base.shape)} does not broadcast to images "
            f"{tuple(images.shape)}; use a float, (C, 1, 1), (C, H, W) or (B, C, H, W)"
        ) from None
    if base.dim() == 4 and base.shape[0] != 1 and base.shape[0] != images.shape[0]:
        raise TvdiagError(f"baseline batch {base.shape[0]} != images batch {images.shape[0]}")
    return base


def apply_patch_mask(images: Tensor, masks: Tensor, patch_size: int,
                     baseline: float | Tensor = 0.0) -> Tensor:
    """Masked images ``x_S = where(z_up, x, baseline)``.

    Args:
        images: (N, C, H, W) images (one row per mask).
        masks: (N, M) bool, True = patch kept.
        patch_size: patch side in pixels.
        baseline: float or tensor broadcastable to ``images``.

    Returns:
        (N, C, H, W) masked images, dtype of ``images``.
    """
    grid = patch_grid(images, patch_size)
    if masks.shape != (images.shape[0], grid[0] * grid[1]):
        raise TvdiagError(f"masks must have shape {(images.shape[0], grid[0] * grid[1])}, "
                          f"got {tuple(masks.shape)}")
    base = _check_baseline(baseline, images)
    up = upsample_patch_mask(masks.to(device=images.device, dtype=torch.bool), grid, patch_size)
    return torch.where(up, images, base)


def patch_means(maps: Tensor, patch_size: int) -> Tensor:
    """Average a pixel map (B, H, W) within each patch -> (B, M), row-major patches."""
    if maps.dim() != 3:
        raise TvdiagError(f"maps must have shape (B, H, W), got {tuple(maps.shape)}")
    gh, gw = patch_grid(maps[:, None], patch_size)
    b = maps.shape[0]
    return maps.reshape(b, gh, patch_size, gw, patch_size).mean(dim=(2, 4)).reshape(b, gh * gw)


def _select(out: Tensor, targets: Tensor, output: str) -> Tensor:
    if output == "prob":
        out = torch.softmax(out.double(), dim=-1)
    return out.gather(1, targets[:, None]).squeeze(1).double()


@torch.no_grad()
def coalition_values(predict: Callable[[Tensor], Tensor], images: Tensor, targets: Tensor,
                     masks: Tensor, patch_size: int, baseline: float | Tensor = 0.0,
                     batch_size: int = 2048, output: str = "logit") -> Tensor:
    """Evaluate ``v(S)`` for every image and every one of its coalitions.

    The ``B * n`` masked images are built chunk by chunk (at most ``batch_size`` per
    forward) from the flattened (image, coalition) index, so memory stays at one chunk.

    Args:
        predict: maps images (N, C, H, W) to logits (N, K).
        images: (B, C, H, W) images in the model's (normalised) input space.
        targets: (B,) long target classes.
        masks: (B, n, M) or (n, M) bool coalitions (shared across images if 2-d).
        patch_size: patch side in pixels.
        baseline: value of removed patches (float or tensor broadcastable to images).
        batch_size: maximum images per forward.
        output: ``"logit"`` or ``"prob"`` (softmax probability of the target).

    Returns:
        (B, n) float64 values ``v(S)``.
    """
    if output not in OUTPUTS:
        raise unknown("output", output, OUTPUTS)
    if batch_size < 1:
        raise TvdiagError(f"batch_size must be >= 1, got {batch_size}")
    grid = patch_grid(images, patch_size)
    m = grid[0] * grid[1]
    b = images.shape[0]
    if masks.dim() == 2:
        masks = masks.unsqueeze(0).expand(b, *masks.shape)
    if masks.dim() != 3 or masks.shape[0] != b or masks.shape[2] != m:
        raise TvdiagError(f"masks must have shape ({b}, n, {m}), got {tuple(masks.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=images.device)
    if targets.shape != (b,):
        raise TvdiagError(f"targets must have shape ({b},), got {tuple(targets.shape)}")
    base = _check_baseline(baseline, images)
    per_image_base = base.dim() == 4 and base.shape[0] == b and b > 1
    n = masks.shape[1]
    flat_masks = masks.reshape(b * n, m).to(device=images.device, dtype=torch.bool)
    values = torch.empty(b * n, dtype=torch.float64, device=images.device)
    for start in range(0, b * n, batch_size):
        stop = min(start + batch_size, b * n)
        img_idx = torch.arange(start, stop, device=images.device) // n
        x = images.index_select(0, img_idx)
        bs = base.index_select(0, img_idx) if per_image_base else base
        up = upsample_patch_mask(flat_masks[start:stop], grid, patch_size)
        out = predict(torch.where(up, x, bs))
        if out.dim() != 2 or out.shape[0] != stop - start:
            raise TvdiagError(f"predict must return (N, K) logits, got {tuple(out.shape)}")
        values[start:stop] = _select(out, targets.index_select(0, img_idx), output)
    return values.reshape(b, n)
