"""Batched Kernel SHAP over image patches (Lundberg & Lee 2017; Covert & Lee 2021).

Players are the ``M`` patches of an image, ``v(S)`` the target output on the image with
the patches outside ``S`` replaced by a baseline (:mod:`train.explain.masking`).
Kernel SHAP solves the Shapley-kernel weighted least squares

    min_phi  sum_{0 < |S| < M} pi(S) (v(S) - v(∅) - z_S^T phi)^2
    s.t.     1^T phi = v(N) - v(∅),              pi(S) = (M-1) / (C(M,|S|) |S| (M-|S|)),

whose solution is exactly the Shapley value. The sum is estimated by sampling: a size
``s`` is drawn with probability ∝ C(M,s) pi(s) ∝ 1/(s(M-s)) (the kernel mass of that
size), then a uniform subset of that size, so every sampled coalition gets weight 1.
With ``Â = mean z z^T`` and ``b̂ = mean z (v(S) - v(∅))`` the constrained solution is the
KKT system

    [Â  1] [phi]   [b̂            ]
    [1ᵀ 0] [ mu] = [v(N) - v(∅)   ],

solved for all images at once in float64 by writing ``phi = (v(N) - v(∅))/M 1 + Q beta``
with ``Q`` an orthonormal basis of ``1^⊥`` and solving the reduced normal equations
``(Qᵀ Â Q) beta = Qᵀ (b̂ - Â 1 (v(N) - v(∅))/M)`` with one batched ``torch.linalg.eigh``
(minimum-norm solution, with a warning, if the sample leaves it rank-deficient — paired
draws add rank one each on ``1^⊥``, so at least ``M - 1`` distinct pairs are needed).
Efficiency holds exactly, and if ``v`` is additive (``v(S) = v(∅) + z_S^T w``) then
``b̂ = Â w`` and ``phi = w`` exactly for any sample with a nonsingular system. Paired
sampling adds the complement of every drawn coalition (same kernel mass), which cancels
the even part of the error (Covert & Lee 2021).

The standard error is the sandwich (delta-method) estimate of Covert & Lee: with
``P = Q (Qᵀ Â Q)^+ Qᵀ`` (``d phi / d b̂``, the top-left block of the KKT inverse) and
residuals ``r_S = v(S) - v(∅) - z_S^T phi``,

    Cov(phi) ≈ P Cov(z_S r_S) P^T / (n_units - M + 1),

where a unit is a coalition or, with pairing, the mean over a coalition and its
complement, and ``n_units - M + 1`` (instead of ``n_units``) is an HC1-style correction
for the ``M - 1`` free parameters. It is asymptotic: at 128 coalitions for M = 16 it still
underestimates the spread over seeds by roughly 10-20 % on strongly nonlinear games.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
from torch import Tensor

from train.devices import autocast, module_device
from train.errors import TvdiagError
from train.explain.masking import coalition_values, patch_grid
from train.losses import zscore

__all__ = [
    "KernelShapWarning",
    "KernelShapEstimate",
    "size_distribution",
    "sample_coalitions",
    "solve_kernel_shap",
    "kernel_shap_estimate",
    "kernel_shap",
    "samples_for",
    "noise_ceiling",
]


_RCOND = 1e-9


def _sum_zero_basis(m: int, device: torch.device) -> Tensor:
    """(M, M-1) orthonormal basis of ``{v : 1^T v = 0}``."""
    centring = torch.eye(m, dtype=torch.float64, device=device) - 1.0 / m
    return torch.linalg.eigh(centring)[1][:, 1:]


class KernelShapWarning(UserWarning):
    """Kernel SHAP had too few coalitions for a unique least-squares solution."""

@dataclasses.dataclass(frozen=True, repr=False)
class KernelShapEstimate:
    """Kernel SHAP attributions of a batch of images with their standard errors.

    Attributes:
        values: (B, M) float64 attributions; rows sum to ``v_full - v_empty``.
        stderr: (B, M) float64 sandwich standard errors of ``values`` (NaN when there
            are no more sampling units than patches).
        v_empty: (B,) value of the all-baseline image.
        v_full: (B,) value of the unmasked image.
        n_samples: coalitions per image (pairs counted twice), excluding ∅ and N.
        paired: whether complements were added.
        output: ``"logit"`` or ``"prob"``.
    """

    values: Tensor
    stderr: Tensor
    v_empty: Tensor
    v_full: Tensor
    n_samples: int
    paired: bool
    output: str

    @property
    def n_players(self) -> int:
        """Number of patches ``M``."""
        return self.values.shape[1]

    def forwards_per_image(self) -> int:
        """Model evaluations per image: the sampled coalitions plus ∅ and N."""
        return self.n_samples + 2

    def relative_error(self) -> float:
        """Mean stderr over the mean absolute attribution (noise-to-signal ratio)."""
        return float(self.stderr.mean() / self.values.abs().mean().clamp_min(1e-300))

    def to_dict(self) -> dict:
        """Scalar summary for a pandas row."""
        return {
            "n_images": self.values.shape[0],
            "n_players": self.n_players,
            "n_samples": self.n_samples,
            "paired": self.paired,
            "output": self.output,
            "mean_abs_value": float(self.values.abs().mean()),
            "mean_stderr": float(self.stderr.mean()),
        }

    def __repr__(self) -> str:
        b, m = self.values.shape
        return (f"KernelShapEstimate(images={b}, players={m}, n_samples={self.n_samples}, "
                f"paired={self.paired}, output={self.output!r}, "
                f"mean|phi|={float(self.values.abs().mean()):.4g}, "
                f"mean stderr={float(self.stderr.mean()):.3g})")


def size_distribution(m: int) -> Tensor:
    """Probability of coalition size ``s = 1..M-1`` under the Shapley kernel.

    ``p(s) ∝ C(M, s) pi(s) = (M-1) / (s (M-s))``; symmetric, ``p(s) = p(M-s)``.
    """
    s = torch.arange(1, m, dtype=torch.float64)
    p = 1.0 / (s * (m - s))
    return p / p.sum()


def sample_coalitions(batch: int, m: int, n_samples: int, paired: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
    """Independent Shapley-kernel coalitions for each of ``batch`` images.

    A size is drawn from :func:`size_distribution`, then a uniform subset of that size
    (ranks of i.i.d. uniforms below ``s``). With ``paired`` the ``n_samples / 2`` draws are
    followed by their complements, as rows ``2j`` (draw) and ``2j + 1`` (complement).

    Returns:
        (batch, n_samples, m) bool on the generator's device (CPU by default).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    n_draw = n_samples // 2 if paired else n_samples
    p = size_distribution(m).to(device)
    sizes = torch.multinomial(p, batch * n_draw, replacement=True, generator=generator) + 1
    u = torch.rand(batch, n_draw, m, generator=generator, device=device)
    ranks = u.argsort(-1).argsort(-1)
    z = ranks < sizes.reshape(batch, n_draw, 1)
    if paired:
        z = torch.stack([z, ~z], dim=2).reshape(batch, 2 * n_draw, m)
    return z


def solve_kernel_shap(masks: Tensor, values: Tensor, v_empty: Tensor, v_full: Tensor,
                      paired: bool = True) -> tuple[Tensor, Tensor]:
    """Constrained least squares of Kernel SHAP for a batch, with sandwich stderr.

    Args:
        masks: (B, n, M) bool coalitions sampled from the Shapley kernel.
        values: (B, n) ``v(S)`` of those coalitions.
        v_empty: (B,) ``v(∅)``.
        v_full: (B,) ``v(N)``.
        paired: rows ``2j, 2j+1`` are a coalition and its complement (one sampling unit).

    Returns:
        ``(phi, stderr)``, each (B, M) float64.
    """
    z = masks.double()
    b, n, m = z.shape
    y = values.double() - v_empty.double()[:, None]
    delta = v_full.double() - v_empty.double()
    a_hat = z.transpose(1, 2) @ z / n
    b_hat = (z.transpose(1, 2) @ y[..., None]).squeeze(-1) / n
    # phi = delta/M 1 + Q beta with Q an orthonormal basis of 1^perp: the constraint holds
    # exactly and beta solves the reduced normal equations (Q^T A Q) beta = Q^T (b - A 1 delta/M)
    q = _sum_zero_basis(m, z.device)
    phi0 = delta[:, None].expand(b, m) / m
    reduced = q.T @ a_hat @ q
    lam, vec = torch.linalg.eigh(reduced)
    tol = lam[:, -1:].clamp_min(1e-300) * _RCOND
    ok = lam > tol
    deficient = (~ok).sum(1)
    if bool(deficient.any()):
        warnings.warn(f"Kernel SHAP least squares rank-deficient for {int((deficient > 0).sum())} "
                      f"of {b} images (n_samples={n} for M={m}); using the minimum-norm solution",
                      KernelShapWarning, stacklevel=3)
    inv_lam = torch.where(ok, 1.0 / lam.clamp_min(1e-300), torch.zeros_like(lam))
    sens = q @ (vec * inv_lam[:, None, :]) @ vec.transpose(1, 2) @ q.T  # d phi / d b_hat
    rhs = b_hat - (a_hat @ phi0[..., None]).squeeze(-1)
    phi = phi0 + (sens @ rhs[..., None]).squeeze(-1)

    resid = y - (z @ phi[..., None]).squeeze(-1)
    g = z * resid[..., None]
    if paired and n % 2 == 0:
        g = g.reshape(b, n // 2, 2, m).mean(2)
    units = g.shape[1]
    if units <= m:
        return phi, torch.full_like(phi, float("nan"))
    g = g - g.mean(1, keepdim=True)
    cov = g.transpose(1, 2) @ g / (units - 1)
    p = sens
    # HC1-style small-sample correction for the M - 1 free parameters
    var = torch.einsum("bij,bjk,bik->bi", p, cov, p) / (units - m + 1)
    return phi, var.clamp_min(0).sqrt()


def kernel_shap_estimate(predict: Callable[[Tensor], Tensor], images: Tensor, targets: Tensor,
                         patch_size: int, n_samples: int = 128, baseline: float | Tensor = 0.0,
                         batch_size: int = 2048, paired: bool = True,
                         generator: torch.Generator | None = None,
                         output: str = "logit", bf16: bool = False) -> KernelShapEstimate:
    """Kernel SHAP over patches with standard errors; see :func:`kernel_shap`.

    When ``predict`` is a module, the images go to its device and the estimate comes back on
    the images' own device; coalitions are drawn on the generator's device either way, so the
    sample does not depend on where the forwards run.
    """
    home = images.device
    if isinstance(predict, torch.nn.Module):
        device = module_device(predict)
        images, targets = images.to(device), torch.as_tensor(targets).to(device)
    with autocast(images.device, bf16):
        est = _estimate(predict, images, targets, patch_size, n_samples, baseline, batch_size, paired, generator,
                        output)
    return est if home == images.device else dataclasses.replace(
        est, **{f.name: getattr(est, f.name).to(home) for f in dataclasses.fields(est)
                if isinstance(getattr(est, f.name), Tensor)})


def _estimate(predict, images, targets, patch_size, n_samples, baseline, batch_size, paired, generator,
              output) -> KernelShapEstimate:
    """The estimate on the images' own device (the body of :func:`kernel_shap_estimate`)."""
    gh, gw = patch_grid(images, patch_size)
    m = gh * gw
    if not isinstance(n_samples, int) or n_samples < 2:
        raise TvdiagError(f"n_samples must be an int >= 2, got {n_samples!r}")
    if paired and n_samples % 2:
        raise TvdiagError(f"paired sampling needs an even n_samples, got {n_samples}")
    bsz = images.shape[0]
    if m == 1:
        masks = torch.tensor([[False], [True]], device=images.device)
        vals = coalition_values(predict, images, targets, masks, patch_size, baseline,
                                batch_size, output)
        zero = torch.zeros(bsz, 1, dtype=torch.float64, device=images.device)
        return KernelShapEstimate((vals[:, 1] - vals[:, 0])[:, None], zero, vals[:, 0],
                                  vals[:, 1], 0, paired, output)
    if n_samples < m:
        warnings.warn(f"n_samples={n_samples} < M={m} patches: the Kernel SHAP system is "
                      "underdetermined", KernelShapWarning, stacklevel=3)
    z = sample_coalitions(bsz, m, n_samples, paired, generator).to(images.device)
    ends = torch.zeros(bsz, 2, m, dtype=torch.bool, device=images.device)
    ends[:, 1] = True
    vals = coalition_values(predict, images, targets, torch.cat([z, ends], dim=1), patch_size,
                            baseline, batch_size, output)
    v_empty, v_full = vals[:, -2], vals[:, -1]
    phi, se = solve_kernel_shap(z, vals[:, :-2], v_empty, v_full, paired)
    return KernelShapEstimate(phi, se, v_empty, v_full, n_samples, paired, output)


def kernel_shap(predict: Callable[[Tensor], Tensor], images: Tensor, targets: Tensor,
                patch_size: int, n_samples: int = 128, baseline: float | Tensor = 0.0,
                batch_size: int = 2048, paired: bool = True,
                generator: torch.Generator | None = None, output: str = "logit", bf16: bool = False) -> Tensor:
    """Kernel SHAP patch attributions of a batch of images.

    ``v(S)`` is the target logit (or softmax probability) of ``predict`` on the image with
    the patches outside ``S`` set to ``baseline``; the attributions solve the Shapley-kernel
    weighted least squares with ``sum_i phi_i = v(N) - v(∅)`` enforced exactly (module
    docstring). All ``B * (n_samples + 2)`` masked images go through ``predict`` in chunks
    of ``batch_size``; each image gets its own coalitions.

    Args:
        predict: maps images (N, C, H, W) to logits (N, K); called under ``no_grad``
            (put the model in eval mode yourself).
        images: (B, C, H, W) images in normalised input space.
        targets: (B,) long target classes.
        patch_size: patch side in pixels (``M = H W / p^2`` players).
        n_samples: sampled coalitions per image, complements included (even if paired).
        baseline: removed-patch value, float or tensor broadcastable to ``images``
            (0 = the backbone's per-channel normalisation mean, a constant image — not the
            data set's mean image; pass a (1, C, H, W) mean image for that).
        batch_size: maximum images per forward.
        paired: add the complement of each sampled coalition.
        generator: makes the sampling deterministic.
        output: ``"logit"`` or ``"prob"``.
        bf16: run the forwards under bf16 autocast (CUDA only, :func:`train.devices.autocast`);
            the least squares stay float64.

    Returns:
        (B, M) float32 attributions, on the images' device (forwards run on a module's device).

    Raises:
        TvdiagError: bad shapes, odd ``n_samples`` with pairing, unknown ``output``.
    """
    est = kernel_shap_estimate(predict, images, targets, patch_size, n_samples, baseline,
                               batch_size, paired, generator, output, bf16)
    return est.values.float()


def samples_for(num_patches: int, per_patch: float = 10.0) -> int:
    """Coalitions per image at the preprint's density: ≈ ``per_patch`` · M, even (for pairing).

    The preprint uses 500 perturbations at M = 49 (≈ 10 per patch): M = 16 → 160, M = 49 → 490.
    """
    return max(2, 2 * round(per_patch * num_patches / 2))


def noise_ceiling(predict: Callable[[Tensor], Tensor], images: Tensor, targets: Tensor, patch_size: int,
                  n_samples: int, seeds: tuple[int, int] = (0, 1), **kwargs) -> float:
    """E-RMSE between two independent Kernel SHAP runs on the same model and images.

    ``sqrt(mean_n mean_m (Norm(φ_a) − Norm(φ_b))²)`` with φ_a, φ_b from generators seeded
    ``seeds[0]`` and ``seeds[1]`` (Norm = z-score over patches, float64). It is the noise of the
    supervision itself: if each run is the exact Shapley value plus independent noise, a model
    that predicts the exact values scores ≈ this / √2 against one run, and no model can be
    expected to beat that floor. ``kwargs`` go to :func:`kernel_shap` (baseline, output, …).
    """

    if seeds[0] == seeds[1]:
        raise TvdiagError(f"noise_ceiling needs two different seeds, got {seeds}")
    runs = [kernel_shap_estimate(predict, images, targets, patch_size, n_samples,
                                 generator=torch.Generator().manual_seed(int(s)), **kwargs).values
            for s in seeds]
    return float((zscore(runs[0]) - zscore(runs[1])).pow(2).mean().sqrt())
