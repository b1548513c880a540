"""Tests of explanation supervision: exact Shapley, Kernel SHAP, Grad-CAM, captum bench."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from train.errors import TvdiagError, UnknownNameError
from train.explain import (
    KernelShapWarning,
    apply_patch_mask,
    exact_shapley,
    gradcam_patches,
    kernel_shap,
    kernel_shap_estimate,
    patch_means,
    shapley_from_table,
)
from train.explain.bench import compare_with_captum, patch_feature_mask, per_image_pearson
from train.explain.gradcam import token_reshape
from train.explain.kernelshap import noise_ceiling, sample_coalitions, samples_for, size_distribution
from train.losses import zscore
from train.explain.shapley import all_coalitions


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- small value functions -------------------------------------------------------------

def linear_model(n_pix, n_cls=4, seed=0):
    """f(x) = W vec(x): v(S) is additive in the patch mask (Kernel SHAP is exact)."""
    w = torch.randn(n_cls, n_pix, generator=gen(seed), dtype=torch.float64)
    return w, lambda x: x.flatten(1) @ w.T


def nonlinear_model(n_pix, n_cls=4, seed=0):
    """tanh plus squares of linear features: strong interactions between patches."""
    w1 = torch.randn(n_cls, n_pix, generator=gen(seed), dtype=torch.float64) / n_pix ** 0.5
    w2 = torch.randn(n_cls, n_pix, generator=gen(seed + 1), dtype=torch.float64) / n_pix ** 0.5
    return lambda x: 2 * torch.tanh(2 * x.flatten(1) @ w1.T) + (x.flatten(1) @ w2.T) ** 2


class HeadClassifier(nn.Module):
    """logits = normalize(visual(x)) @ W^T * scale, like SelfExplainingCLIP."""

    def __init__(self, visual, n_cls, dim, scale=100.0, seed=0):
        super().__init__()
        self.visual = visual
        head = torch.randn(n_cls, dim, generator=gen(seed))
        self.register_buffer("head", nn.functional.normalize(head, dim=-1))
        self.scale = scale

    def forward(self, x):
        return nn.functional.normalize(self.visual(x), dim=-1) @ self.head.T * self.scale


@pytest.fixture(scope="module")
def tiny_clip_classifier():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    tiny = CLIP(embed_dim=64,
                vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=4, head_width=32,
                                mlp_ratio=4.0),
                text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=2))
    return HeadClassifier(tiny.visual, n_cls=10, dim=64).eval()


@pytest.fixture(scope="module")
def small_vit_classifier():
    """A 16x16 open_clip ViT with 4x4 patches (M = 16), cheap enough to enumerate 2^16.

    Weights are scaled up 2x so that the game is clearly non-additive.
    """
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2,
                            mlp_ratio=2.0, output_dim=16)
    with torch.no_grad():
        for p in vit.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    return HeadClassifier(vit, n_cls=5, dim=16).eval()


# --- masking ----------------------------------------------------------------------------

def test_mask_order_matches_vit_tokens(tiny_clip_classifier):
    """Patch m of the mask is token m of open_clip's patch embedding (row-major)."""
    conv = tiny_clip_classifier.visual.conv1
    x = torch.randn(16, 3, 32, 32, generator=gen(0))
    keep = torch.eye(16, dtype=torch.bool)  # image m keeps only patch m
    masked = apply_patch_mask(x, keep, 8, baseline=0.0)
    with torch.no_grad():
        tokens = conv(masked).flatten(2).transpose(1, 2)  # (B, M, W), conv1 has no bias
    nonzero = tokens.abs().sum(-1) > 0
    assert torch.equal(nonzero, keep)


def test_apply_patch_mask_and_patch_means():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float64).reshape(2, 1, 4, 6)
    masks = torch.tensor([[1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    out = apply_patch_mask(x, masks, 2, baseline=-1.0)
    expected = torch.full_like(x, -1.0)
    expected[0, :, 0:2, 0:2] = x[0, :, 0:2, 0:2]
    expected[0, :, 2:4, 4:6] = x[0, :, 2:4, 4:6]
    expected[1, :, 0:2, 2:4] = x[1, :, 0:2, 2:4]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    means = patch_means(x[:, 0], 2)
    ref = torch.tensor([[x[b, 0, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean() for r in range(2)
                         for c in range(3)] for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(means, ref, rtol=0, atol=1e-12)


def test_bad_input_raises():
    x = torch.zeros(1, 3, 8, 8)
    f = lambda z: z.flatten(1)[:, :2]  # noqa: E731
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(TvdiagError, match="multiple of patch_size"):
        kernel_shap(f, x, t, patch_size=3)
    with pytest.raises(TvdiagError, match="even"):
        kernel_shap(f, x, t, patch_size=2, n_samples=31)
    with pytest.raises(UnknownNameError, match="Available: logit, prob"):
        kernel_shap(f, x, t, patch_size=2, output="proba")
    with pytest.raises(TvdiagError, match="M = 64 > 16"):
        exact_shapley(f, x, t, patch_size=1)
    with pytest.raises(TvdiagError, match="baseline"):
        kernel_shap(f, x, t, patch_size=2, baseline=torch.zeros(2, 3, 8, 8))


# --- exact Shapley ----------------------------------------------------------------------

def test_exact_shapley_hand_computed_games():
    sizes = all_coalitions(3).sum(1)
    majority = (sizes >= 2).double()[None]
    torch.testing.assert_close(shapley_from_table(majority), torch.full((1, 3), 1 / 3,
                               dtype=torch.float64), rtol=0, atol=1e-15)
    # weighted voting [quota 3; weights 2, 1, 1]: phi = (2/3, 1/6, 1/6)
    weights = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    voting = ((all_coalitions(3).double() @ weights) >= 3).double()[None]
    torch.testing.assert_close(shapley_from_table(voting),
                               torch.tensor([[2 / 3, 1 / 6, 1 / 6]], dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_exact_shapley_through_masking_majority_of_patches():
    """Three 2x2 patches of a 2x6 image; v = 1 iff at least two patches are kept."""
    x = torch.ones(2, 1, 2, 6, dtype=torch.float64)

    def predict(z):
        kept = (z.reshape(-1, 2, 3, 2).sum((1, 3)) > 0).sum(1)
        return (kept >= 2).double()[:, None]

    phi = exact_shapley(predict, x, torch.zeros(2, dtype=torch.long), patch_size=2)
    torch.testing.assert_close(phi, torch.full((2, 3), 1 / 3, dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_exact_shapley_efficiency_and_symmetry():
    predict = nonlinear_model(3 * 8 * 8)
    x = torch.randn(3, 3, 8, 8, generator=gen(1), dtype=torch.float64)
    t = torch.tensor([0, 1, 3])
    phi = exact_shapley(predict, x, t, patch_size=2, baseline=0.25, batch_size=16384)
    out_full = predict(x)[torch.arange(3), t]
    out_empty = predict(torch.full_like(x, 0.25))[torch.arange(3), t]
    torch.testing.assert_close(phi.sum(1), out_full - out_empty, rtol=0, atol=1e-10)
    # symmetry: two identical patches of a symmetric game get equal values
    x_sym = x.clone()
    x_sym[:, :, 0:2, 2:4] = x_sym[:, :, 0:2, 0:2]

    def sym(z):
        return (z[..., 0:2, 0:2] * z[..., 0:2, 2:4]).flatten(1).sum(1, keepdim=True) ** 2
    phi_s = exact_shapley(sym, x_sym, torch.zeros(3, dtype=torch.long), 2, batch_size=16384)
    torch.testing.assert_close(phi_s[:, 0], phi_s[:, 1], rtol=1e-12, atol=1e-12)
    assert phi_s[:, 2:].abs().max() < 1e-12  # null players


# --- Kernel SHAP ------------------------------------------------------------------------

def test_size_distribution_and_paired_sampling():
    m = 16
    p = size_distribution(m)
    s = torch.arange(1, m, dtype=torch.float64)
    torch.testing.assert_close(p, (1 / (s * (m - s))) / (1 / (s * (m - s))).sum())
    z = sample_coalitions(50, m, 400, paired=True, generator=gen(0))
    assert z.shape == (50, 400, m)
    assert torch.equal(z[:, 1::2], ~z[:, 0::2])
    sizes = z[:, 0::2].sum(-1).flatten()
    freq = torch.bincount(sizes, minlength=m + 1)[1:m].double() / sizes.numel()
    se = (p * (1 - p) / sizes.numel()).sqrt()
    assert ((freq - p).abs() / se).max() < 5
    # within a size, every patch is equally likely (uniform subsets)
    per_patch = z[:, 0::2].double().mean((0, 1))
    assert (per_patch - 0.5).abs().max() < 0.02


def test_kernel_shap_exact_for_additive_games():
    w, predict = linear_model(3 * 8 * 8)
    x = torch.randn(3, 3, 8, 8, generator=gen(2), dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    base = 0.3
    # closed form: phi_i = sum over patch i's pixels of W_c (x - baseline)
    contrib = (w[t].reshape(3, 3, 8, 8) * (x - base)).sum(1)
    ref = patch_means(contrib, 2) * 4
    exact = exact_shapley(predict, x, t, 2, baseline=base, batch_size=16384)
    torch.testing.assert_close(exact, ref, rtol=0, atol=1e-10)
    for n, paired in [(48, True), (128, True), (40, False)]:
        est = kernel_shap_estimate(predict, x, t, 2, n, baseline=base, paired=paired,
                                   generator=gen(n))
        torch.testing.assert_close(est.values, ref, rtol=0, atol=1e-9)
        assert est.stderr.max() < 1e-8  # zero residuals
    phi32 = kernel_shap(predict, x, t, 2, 64, baseline=base, generator=gen(0))
    assert phi32.dtype == torch.float32 and phi32.shape == (3, 16)
    torch.testing.assert_close(phi32, ref.float(), rtol=1e-6, atol=1e-6)


def test_kernel_shap_matches_exact_nonlinear_function():
    predict = nonlinear_model(3 * 8 * 8)
    x = torch.randn(8, 3, 8, 8, generator=gen(3), dtype=torch.float64)
    t = torch.arange(8) % 4
    exact = exact_shapley(predict, x, t, 2, batch_size=16384)
    est = kernel_shap_estimate(predict, x, t, 2, 128, generator=gen(0))
    assert per_image_pearson(est.values, exact).mean() >= 0.95
    torch.testing.assert_close(est.values.sum(1), exact.sum(1), rtol=0, atol=1e-10)
    # more coalitions, smaller error
    big = kernel_shap_estimate(predict, x, t, 2, 2048, generator=gen(0))
    assert (big.values - exact).pow(2).mean() < (est.values - exact).pow(2).mean() / 4


def test_samples_follow_the_papers_density():
    assert samples_for(49) == 490 and samples_for(16) == 160 and samples_for(4, per_patch=2.5) == 10


def test_noise_ceiling_zero_for_additive_and_shrinking_with_samples():
    _, linear = linear_model(3 * 8 * 8)
    x = torch.randn(6, 3, 8, 8, generator=gen(5), dtype=torch.float64)
    t = torch.arange(6) % 4
    assert noise_ceiling(linear, x, t, 2, 64) == pytest.approx(0.0, abs=1e-6)
    predict = nonlinear_model(3 * 8 * 8)
    few, many = noise_ceiling(predict, x, t, 2, 64), noise_ceiling(predict, x, t, 2, 1024)
    # the definition: E-RMSE between the runs of two generators
    a = kernel_shap_estimate(predict, x, t, 2, 64, generator=gen(0)).values
    b = kernel_shap_estimate(predict, x, t, 2, 64, generator=gen(1)).values
    assert few == pytest.approx(float((zscore(a) - zscore(b)).pow(2).mean().sqrt()), rel=1e-12)
    assert 0 < many < few / 2  # error ~ 1/sqrt(samples): 16x the samples, about 1/4 the noise
    with pytest.raises(TvdiagError):
        noise_ceiling(predict, x, t, 2, 64, seeds=(3, 3))


def test_kernel_shap_matches_exact_on_vit(small_vit_classifier):
    x = torch.randn(2, 3, 16, 16, generator=gen(4))
    with torch.no_grad():
        t = small_vit_classifier(x).argmax(1)
    exact = exact_shapley(small_vit_classifier, x, t, 4, batch_size=8192)
    phi = kernel_shap(small_vit_classifier, x, t, 4, n_samples=128, generator=gen(0))
    r = per_image_pearson(phi, exact)
    assert r.mean() >= 0.95, r
    # the game is far from additive: a tiny sample is visibly worse
    crude = kernel_shap(small_vit_classifier, x, t, 4, n_samples=16, generator=gen(0))
    assert per_image_pearson(crude, exact).mean() < r.mean()


def test_kernel_shap_stderr_is_calibrated():
    """z = (phi - exact) / stderr has mean square near 1 (n = 512, 16 patches)."""
    predict = nonlinear_model(3 * 8 * 8, seed=5)
    x = torch.randn(16, 3, 8, 8, generator=gen(5), dtype=torch.float64)
    t = torch.arange(16) % 4
    exact = exact_shapley(predict, x, t, 2, batch_size=16384)
    est = kernel_shap_estimate(predict, x, t, 2, 512, generator=gen(0))
    z2 = ((est.values - exact) / est.stderr).pow(2).mean().item()
    assert 0.6 < z2 < 1.6, z2
    assert set(est.to_dict()) >= {"n_images", "n_players", "mean_stderr"}
    assert "KernelShapEstimate(images=16" in repr(est)


def test_kernel_shap_deterministic_and_chunk_invariant():
    predict = nonlinear_model(3 * 8 * 8)
    x = torch.randn(5, 3, 8, 8, generator=gen(6), dtype=torch.float64)
    t = torch.zeros(5, dtype=torch.long)
    a = kernel_shap(predict, x, t, 2, 64, batch_size=2048, generator=gen(7))
    b = kernel_shap(predict, x, t, 2, 64, batch_size=7, generator=gen(7))
    c = kernel_shap(predict, x, t, 2, 64, generator=gen(8))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.allclose(a, c)
    # every image gets its own coalitions: two identical images get different estimates
    x2 = x[:1].expand(2, -1, -1, -1)
    d = kernel_shap(predict, x2, t[:2], 2, 64, generator=gen(7))
    assert not torch.allclose(d[0], d[1])


def test_kernel_shap_prob_output_and_tensor_baseline():
    predict = nonlinear_model(3 * 4 * 4)
    x = torch.randn(2, 3, 4, 4, generator=gen(9), dtype=torch.float64)
    t = torch.tensor([1, 2])
    base = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64).reshape(3, 1, 1)
    est = kernel_shap_estimate(predict, x, t, 2, 32, baseline=base, output="prob",
                               generator=gen(0))
    p_full = torch.softmax(predict(x), 1)[torch.arange(2), t]
    p_empty = torch.softmax(predict(base.expand_as(x)), 1)[torch.arange(2), t]
    torch.testing.assert_close(est.values.sum(1), p_full - p_empty, rtol=0, atol=1e-12)
    exact = exact_shapley(predict, x, t, 2, baseline=base, output="prob")
    assert per_image_pearson(est.values, exact).mean() > 0.9


def test_kernel_shap_warns_when_underdetermined():
    _, predict = linear_model(3 * 8 * 8)
    x = torch.randn(1, 3, 8, 8, generator=gen(10), dtype=torch.float64)
    with pytest.warns(KernelShapWarning):
        est = kernel_shap_estimate(predict, x, torch.zeros(1, dtype=torch.long), 2, 8,
                                   generator=gen(0))
    assert torch.isfinite(est.values).all() and torch.isnan(est.stderr).all()


# --- Grad-CAM ---------------------------------------------------------------------------

def manual_gradcam(model, x, t):
    """Grad-CAM by hand: hook ln_1 of the last block, ReLU(sum_k mean-grad_k A_k),
    min-max scale, bilinear resize (cv2, as pytorch-grad-cam), patch means by loops."""
    import cv2

    layer = model.visual.transformer.resblocks[-1].ln_1
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    acts = store["a"]  # (B, 1 + 16, W)
    grads = torch.autograd.grad(logits[torch.arange(len(t)), t].sum(), acts)[0]
    acts, grads = acts[:, 1:].detach(), grads[:, 1:]
    cam_tok = torch.relu((acts * grads.mean(1, keepdim=True)).sum(-1)).numpy()  # (B, 16)
    out = np.zeros((len(t), 16))
    for b in range(len(t)):
        grid = np.zeros((4, 4), dtype=np.float32)
        for m in range(16):
            grid[m // 4, m % 4] = cam_tok[b, m]
        grid = grid - grid.min()
        grid = grid / (1e-7 + grid.max())
        pix = cv2.resize(grid, (32, 32))
        pix = pix - pix.min()
        pix = pix / (1e-7 + pix.max())
        for m in range(16):
            r, c = m // 4, m % 4
            out[b, m] = pix[8 * r:8 * r + 8, 8 * c:8 * c + 8].mean()
    return torch.from_numpy(out).float()


def test_gradcam_patches_matches_manual_gradcam(tiny_clip_classifier):
    model = tiny_clip_classifier
    model.train()
    x = torch.randn(5, 3, 32, 32, generator=gen(11))
    t = torch.tensor([0, 3, 7, 9, 1])
    phi = gradcam_patches(model, x, t, batch_size=2)
    assert phi.shape == (5, 16) and phi.dtype == torch.float32
    assert model.training  # restored
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()
    ref = manual_gradcam(model, x, t)
    torch.testing.assert_close(phi, ref, rtol=1e-4, atol=1e-4)
    assert (phi >= 0).all() and (phi <= 1 + 1e-6).all()


def test_token_reshape_layouts():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # CLS + 2x2
    out = token_reshape((2, 2))(tokens)
    assert out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[1, :, 1, 0], tokens[1, 1 + 2])
    seq_first = token_reshape((2, 2), batch_first=False)(tokens.transpose(0, 1))
    torch.testing.assert_close(seq_first, out)


# --- captum comparison ------------------------------------------------------------------

def test_compare_with_captum_smoke(tiny_clip_classifier):
    x = torch.randn(2, 3, 32, 32, generator=gen(12))
    mask = patch_feature_mask(x, 8)
    assert mask.shape == (1, 3, 32, 32) and int(mask[0, 0, 9, 17]) == 1 * 4 + 2
    with torch.no_grad():
        t = tiny_clip_classifier(x).argmax(1)
    res = compare_with_captum(tiny_clip_classifier, x, t, patch_size=8, n_samples=32)
    assert res["n_players"] == 16 and res["forwards_per_image"] == 34
    assert res["ours_images_per_s"] > 0 and res["captum_images_per_s"] > 0
    assert math.isclose(res["speedup"], res["ours_images_per_s"] / res["captum_images_per_s"])
    assert res["agreement_pearson"] > 0.8
