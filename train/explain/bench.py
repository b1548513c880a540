"""Speed and agreement of our batched Kernel SHAP against ``captum.attr.KernelShap``.

Both methods get the same model, images, targets, patch ``feature_mask``, baseline and
the same number of model evaluations per image: ours evaluates ``n_samples`` sampled
coalitions plus ∅ and N, captum is given ``n_samples + 2`` samples (its first two are N
and ∅, weighted 10^6 to approximate the efficiency constraint). Captum fits one linear
model per image, forwarding that image's perturbations in one batch
(``perturbations_per_eval = n_samples + 2``); ours forwards all images' coalitions
together in chunks of ``batch_size``.

Run ``python -m train.explain.bench`` for the tiny open_clip ViT (32x32, M = 16).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from train.explain.kernelshap import kernel_shap
from train.explain.masking import patch_grid

__all__ = ["patch_feature_mask", "per_image_pearson", "compare_with_captum"]


def patch_feature_mask(images: Tensor, patch_size: int) -> Tensor:
    """Captum ``feature_mask`` (1, C, H, W) with pixel values = row-major patch index."""
    gh, gw = patch_grid(images, patch_size)
    ids = torch.arange(gh * gw, device=images.device).reshape(gh, gw)
    ids = ids.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    return ids.expand(1, images.shape[1], *ids.shape).contiguous()


def per_image_pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` (B, M) with the same row of ``b``."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def compare_with_captum(predict: Callable[[Tensor], Tensor], images: Tensor, targets: Tensor,
                        patch_size: int, n_samples: int, baseline: float = 0.0,
                        batch_size: int = 2048, seed: int = 0) -> dict:
    """Images/s of ours and of captum's KernelShap, and their per-image agreement.

    Args:
        predict: maps images (N, C, H, W) to logits (N, K).
        images: (B, C, H, W) images.
        targets: (B,) long target classes.
        patch_size: patch side in pixels.
        n_samples: sampled coalitions per image (even; captum gets ``n_samples + 2``).
        baseline: value of removed patches for both methods.
        batch_size: our maximum images per forward.
        seed: seeds both samplers.

    Returns:
        ``dict(ours_images_per_s, captum_images_per_s, speedup, agreement_pearson,
        agreement_pearson_se, n_images, n_players, forwards_per_image, threads)``;
        ``agreement_pearson`` is the mean over images of the Pearson correlation between
        the two attribution vectors, ``agreement_pearson_se`` its standard error.
    """
    from captum.attr import KernelShap

    targets = torch.as_tensor(targets, dtype=torch.long)
    gh, gw = patch_grid(images, patch_size)
    n_img = images.shape[0]
    gen = torch.Generator().manual_seed(seed)
    kernel_shap(predict, images[:1], targets[:1], patch_size, n_samples, baseline,
                batch_size, generator=gen)  # warm-up
    t0 = time.perf_counter()
    ours = kernel_shap(predict, images, targets, patch_size, n_samples, baseline, batch_size,
                       generator=gen)
    t_ours = time.perf_counter() - t0

    explainer = KernelShap(lambda x: predict(x))
    mask = patch_feature_mask(images, patch_size)
    kwargs = dict(baselines=baseline, feature_mask=mask, n_samples=n_samples + 2,
                  perturbations_per_eval=n_samples + 2)
    torch.manual_seed(seed)
    with torch.no_grad():
        explainer.attribute(images[:1], target=targets[:1], **kwargs)  # warm-up
        t0 = time.perf_counter()
        theirs = explainer.attribute(images, target=targets, return_input_shape=False, **kwargs)
        t_captum = time.perf_counter() - t0

    r = per_image_pearson(ours, theirs.reshape(n_img, gh * gw))
    se = float(r.std() / n_img ** 0.5) if n_img > 1 else float("nan")
    ours_rate = n_img / t_ours
    captum_rate = n_img / t_captum
    return {
        "ours_images_per_s": ours_rate,
        "captum_images_per_s": captum_rate,
        "speedup": ours_rate / captum_rate,
        "agreement_pearson": float(r.mean()),
        "agreement_pearson_se": se,
        "n_images": n_img,
        "n_players": gh * gw,
        "forwards_per_image": n_samples + 2,
        "threads": torch.get_num_threads(),
    }


def _tiny_classifier(seed: int = 0, n_classes: int = 10) -> torch.nn.Module:
    """Random tiny open_clip ViT (32x32, patch 8) with a fixed normalised head."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    clip = CLIP(embed_dim=64,
                vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=4, head_width=32,
                                mlp_ratio=4.0),
                text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=2))
    head = torch.nn.functional.normalize(torch.randn(n_classes, 64), dim=-1)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = clip.visual
            self.register_buffer("head", head)

        def forward(self, x: Tensor) -> Tensor:
            return torch.nn.functional.normalize(self.visual(x), dim=-1) @ self.head.T * 100.0

    return Classifier().eval()


def main(n_images: int = 8, n_samples: int = 64) -> dict:
    """Run :func:`compare_with_captum` on the tiny ViT with random images."""
    model = _tiny_classifier()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n_images, 3, 32, 32, generator=gen)
    with torch.no_grad():
        targets = model(images).argmax(1)
    return compare_with_captum(model, images, targets, patch_size=8, n_samples=n_samples)


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    args = [int(a) for a in sys.argv[1:3]]
    sys.stdout.write(json.dumps(main(*args), indent=2) + "\n")
