"""Grad-CAM patch attributions of a ViT classifier via ``pytorch-grad-cam`` (appendix D).

Grad-CAM (Selvaraju et al.) at a layer with activations ``A`` (W channels over a
``gh x gw`` token grid) and target logit ``y_c``:

    alpha_k = mean_{ij} d y_c / d A_k,ij,     cam = ReLU(sum_k alpha_k A_k),

``pytorch-grad-cam`` then min-max scales each map to [0, 1] and resizes it bilinearly to
the input size (H, W). Following the paper we hook the layer norm of the final residual
block of the vision transformer (``resblocks[-1].ln_1``), drop the prefix (CLS) token,
and average the pixel map within each patch to get ``M = gh * gw`` attributions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from train.errors import TvdiagError
from train.explain.masking import patch_means

__all__ = ["find_vision_transformer", "default_target_layer", "token_reshape", "gradcam_patches"]


def find_vision_transformer(model: nn.Module) -> nn.Module | None:
    """The first open_clip ``VisionTransformer`` inside ``model`` (or ``model`` itself)."""
    from open_clip.transformer import VisionTransformer

    for module in model.modules():
        if isinstance(module, VisionTransformer):
            return module
    return None


def default_target_layer(model: nn.Module) -> nn.Module:
    """``visual.transformer.resblocks[-1].ln_1`` of the open_clip ViT inside ``model``.

    Raises:
        TvdiagError: ``model`` holds no open_clip ``VisionTransformer``.
    """
    vit = find_vision_transformer(model)
    if vit is None:
        raise TvdiagError(f"{type(model).__name__} holds no open_clip VisionTransformer; "
                          "pass target_layer explicitly")
    return vit.transformer.resblocks[-1].ln_1


def token_reshape(grid: tuple[int, int], batch_first: bool = True):
    """``reshape_transform`` for pytorch-grad-cam: tokens -> (B, W, gh, gw).

    Takes the hooked activation (B, L, W) (or (L, B, W) if not ``batch_first``), drops the
    ``L - gh*gw`` prefix tokens (CLS, registers) and lays the patch tokens out row-major.
    """
    gh, gw = grid

    def reshape(tokens: Tensor) -> Tensor:
        if not batch_first:
            tokens = tokens.transpose(0, 1)
        b, length, width = tokens.shape
        if length < gh * gw:
            raise TvdiagError(f"{length} tokens cannot hold a {gh}x{gw} patch grid")
        patches = tokens[:, length - gh * gw:]
        return patches.reshape(b, gh, gw, width).permute(0, 3, 1, 2)

    return reshape


def gradcam_patches(model: nn.Module, images: Tensor, targets: Tensor,
                    target_layer: nn.Module | None = None, grid: tuple[int, int] | None = None,
                    batch_size: int = 256) -> Tensor:
    """Grad-CAM attributions of the target class averaged within each patch.

    Long because the hooks, the batched forward/backward and the patch pooling share the hook
    state and must be removed in the same ``finally``.

    Args:
        model: maps images (B, C, H, W) to logits (B, K); contains an open_clip
            ``VisionTransformer`` unless ``target_layer`` and ``grid`` are given.
        images: (B, C, H, W) images in normalised input space.
        targets: (B,) long target classes.
        target_layer: hooked module; default the final block's ``ln_1``.
        grid: token grid ``(gh, gw)``; default the ViT's ``grid_size``.
        batch_size: images per forward/backward.

    Returns:
        (B, M) float32 attributions in [0, 1] (each map is min-max scaled by
        pytorch-grad-cam before patch averaging), patches row-major.

    Runs on the model's device (pytorch-grad-cam moves each batch there); the attributions
    come back on the images' device.
    The model's training flag and parameters' ``requires_grad`` are restored afterwards;
    parameter gradients are not touched (parameters are frozen during the call).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if images.dim() != 4:
        raise TvdiagError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.shape != (images.shape[0],):
        raise TvdiagError(f"targets must have shape ({images.shape[0]},), "
                          f"got {tuple(targets.shape)}")
    vit = find_vision_transformer(model)
    if target_layer is None:
        target_layer = default_target_layer(model)
    if grid is None:
        if vit is None:
            raise TvdiagError("grid is required when the model holds no open_clip "
                              "VisionTransformer")
        grid = tuple(vit.grid_size)
    batch_first = getattr(getattr(vit, "transformer", None), "batch_first", True)
    h, w = images.shape[-2:]
    gh, gw = grid
    if h % gh or w % gw or h // gh != w // gw:
        raise TvdiagError(f"image {h}x{w} does not split into a {gh}x{gw} grid of square patches")
    patch = h // gh

    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    out = []
    try:
        with GradCAM(model=model, target_layers=[target_layer],
                     reshape_transform=token_reshape(grid, batch_first)) as cam:
            cam.compute_input_gradient = True  # the graph must exist with frozen parameters
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size]
                tg = [ClassifierOutputTarget(int(c)) for c in targets[start:start + batch_size]]
                maps = torch.from_numpy(cam(input_tensor=x, targets=tg))
                out.append(patch_means(maps.float(), patch))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.cat(out).to(images.device)
