"""Image augmentation used while training.

* :func:`random_shift` — pixel shifts by reflection padding + crop (θ_base's pretraining only:
  it has no explanation target that would have to move with the image);
* :func:`roll_patches` — whole-patch shifts for the controlled (θ_ft, θ_ft*) pair: image and φ
  are rolled by the same number of patches, so patch i of the shifted image keeps the
  attribution of the content it shows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of a (B, C, H, W) batch by up to ``max_shift`` pixels (reflect padding)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
    idx_b = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _roll_2d(x: torch.Tensor, shifts: torch.Tensor, unit: int) -> torch.Tensor:
    """out[b, ..., i, j] = x[b, ..., (i − dy_b·unit) mod H, (j − dx_b·unit) mod W] (``torch.roll`` per row)."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    rows = (torch.arange(h)[None, :] - unit * shifts[:, :1]) % h  # (B, H)
    cols = (torch.arange(w)[None, :] - unit * shifts[:, 1:]) % w  # (B, W)
    lead = x.reshape(b, -1, h, w)
    idx_b = torch.arange(b)[:, None, None]
    out = lead.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).reshape(x.shape)


def roll_patches(x: torch.Tensor, phi: torch.Tensor | None, shifts: torch.Tensor,
                 patch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Roll every image by whole patches and its patch attributions with it.

    Rule: a cyclic roll. Image b moves down by ``dy_b`` and right by ``dx_b`` patches
    (``shifts[b] = (dy_b, dx_b)``, negative = up/left); the patches that leave one side re-enter
    on the other, so no content is invented and every image keeps its M patches. φ (B, M,
    row-major over the (H/p, W/p) grid, as the ViT flattens its tokens) is rolled by the same
    (dy_b, dx_b) on the grid. φ of the rolled image is taken to be the rolled φ: exact for
    what the supervision says about *content*, an approximation for a model whose output
    depends on position (position embeddings), which is why the default zoo does not shift.

    Args:
        x: (B, C, H, W) images with H, W multiples of ``patch_size``.
        phi: (B, M) attributions, or None.
        shifts: (B, 2) integer patch shifts (dy, dx).
        patch_size: p in pixels.

    Returns:
        The rolled images and the rolled φ (None when ``phi`` is None).
    """
    gh, gw = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    shifts = shifts.long()
    rolled_x = _roll_2d(x, shifts, patch_size)
    if phi is None:
        return rolled_x, None
    rolled_phi = _roll_2d(phi.reshape(-1, gh, gw), shifts, 1).reshape(phi.shape)
    return rolled_x, rolled_phi
