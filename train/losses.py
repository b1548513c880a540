"""Losses of the paper (eq. 4–5) and the contrastive pretraining loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.errors import TvdiagError


def zscore(u: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Norm(u) = (u − μ_u) / σ_u over ``dim`` (population standard deviation)."""
    mu = u.mean(dim=dim, keepdim=True)
    sigma = u.std(dim=dim, keepdim=True, unbiased=False)
    return (u - mu) / (sigma + eps)


def explanation_loss(phi_pred: torch.Tensor, phi_true: torch.Tensor) -> torch.Tensor:
    """L_exp (eq. 5, scaled as §6.1): mean over images *and patches* of (Norm(Φ̃_y) − Norm(φ))².

    So E-RMSE = sqrt(L_exp) exactly (:func:`diag.transfer.metrics` averages per patch too). A sum over
    the M patches would weigh explanations M times more, and α = 0.8 would act like a
    per-patch α of 0.2 at M = 16.

    Args:
        phi_pred: (B, M) predicted attributions for the labelled class.
        phi_true: (B, M) ground-truth attributions.
    """
    return (zscore(phi_pred) - zscore(phi_true)).pow(2).mean()


def check_alpha(alpha: float) -> float:
    """Validate α ∈ [0, 1]."""
    if not (0.0 <= float(alpha) <= 1.0):
        raise TvdiagError(f"alpha must be in [0, 1], got {alpha}")
    return float(alpha)


def alpha_loss(logits: torch.Tensor, phi: torch.Tensor | None, labels: torch.Tensor,
               phi_true: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """L_α = α·CE + (1 − α)·L_exp (eq. 4). ``phi`` is (B, C, M); the labelled class is used."""
    loss = alpha * F.cross_entropy(logits, labels) if alpha > 0 else logits.new_zeros(())
    if alpha < 1:
        if phi is None or phi_true is None:
            raise TvdiagError("alpha < 1 needs explanation supervision phi")
        picked = phi.gather(1, labels[:, None, None].expand(-1, 1, phi.shape[-1])).squeeze(1)
        loss = loss + (1 - alpha) * explanation_loss(picked, phi_true)
    return loss


def multi_positive_contrastive(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor,
                               logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every pair with the same class group counts as positive.

    With ~100 distinct class names across the suite, many captions in a batch describe the
    same class; treating them as negatives (plain InfoNCE) fights the labels. The target
    distribution of each row is uniform over the items of its group.
    """
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale * image_emb @ text_emb.T
    same = (groups[:, None] == groups[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)
