"""Explanation supervision: patch attributions that the self-explaining model learns.

- :func:`kernel_shap` — batched Kernel SHAP over image patches (:mod:`.kernelshap`);
- :func:`exact_shapley` — exact Shapley values by enumerating 2^M coalitions (:mod:`.shapley`);
- :func:`gradcam_patches` — Grad-CAM (pytorch-grad-cam) averaged to patches (:mod:`.gradcam`);
- :mod:`.masking` — patch masks -> masked images and coalition values;
- :mod:`.bench` — speed/agreement comparison with captum's KernelShap.

Patches are numbered row-major, in the order a ViT flattens its patch tokens.
"""

from train.explain.gradcam import gradcam_patches
from train.explain.kernelshap import (
    KernelShapEstimate,
    KernelShapWarning,
    kernel_shap,
    kernel_shap_estimate,
    noise_ceiling,
    samples_for,
)
from train.explain.masking import apply_patch_mask, coalition_values, patch_means
from train.explain.shapley import exact_shapley, shapley_from_table

__all__ = [
    "KernelShapEstimate",
    "KernelShapWarning",
    "apply_patch_mask",
    "coalition_values",
    "exact_shapley",
    "gradcam_patches",
    "kernel_shap",
    "kernel_shap_estimate",
    "noise_ceiling",
    "patch_means",
    "samples_for",
    "shapley_from_table",
]
