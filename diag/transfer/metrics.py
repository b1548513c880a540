"""Explanation and classification metrics of the paper's tables (§6).

* accuracy;
* E-RMSE: sqrt of the explanation loss (eq. 5) averaged per patch,
  ``sqrt(mean_n mean_m (Norm(Φ̃_y) − Norm(φ))²)``, with Norm the z-score over patches.
  Two unrelated z-scored maps score ≈ √2 ≈ 1.414 (E‖a − b‖²/M = 2 for independent
  standardised a, b), identical maps 0, anti-correlated maps up to 2;
* Kendall rank correlation (τ-b) between predicted and true attributions, per image, averaged;
* image-specific E-RMSE: the same after subtracting each side's mean map (Φ̃ minus the mean
  prediction over the evaluated images, φ minus the domain's mean φ — over its train φ when
  given) *before* the z-score. A fixed spatial prior (the same map for every image) scores
  exactly 1 on it (its centred map is 0), unrelated maps ≈ √2: below 1 means image-specific
  explanation, which a prior can never pass for;
* Kendall rank correlation (τ-b) between predicted and true attributions, per image, averaged;
* IoU@K of the top-K patch index sets. The paper uses K = 1, 5, 10 at M = 49 patches; on
  other grids K = ⌊k·M/49⌋ (at least 1): never more than the paper's fraction of M
  (M = 16 → K = 1, 1, 3; M = 49 → 1, 5, 10; M = 256 → 5, 26, 52). IoU's chance level — the
  expected IoU of two independent uniform K-subsets, E[I/(2K − I)] with I hypergeometric — is
  reported beside it (M = 16: 0.0625, 0.0625, 0.1202; M = 49: 0.0204, 0.0591, 0.1183); the
  chance *overlap* fraction I/K is K/M.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from diag.constants import PAPER_KS, PAPER_M
from train.losses import zscore

#: Metrics of every row; ``ermse_img`` is the image-specific E-RMSE (:func:`diag.transfer.metrics.ermse_image_specific`).
METRICS = ("accuracy", "ermse", "ermse_img", "kendall", "iou1", "iou5", "iou10")


def scaled_ks(num_patches: int) -> tuple[int, int, int]:
    """K for IoU@1/5/10 on a grid of ``num_patches``: ⌊k · M / 49⌋, at least 1, at most M."""
    return tuple(max(1, min(num_patches, k * num_patches // PAPER_M)) for k in PAPER_KS)


def iou_chance(num_patches: int, k: int) -> float:
    """Expected IoU@K of two independent uniform K-subsets of M patches.

    ``Σ_i P(I = i) · i / (2K − i)`` with I ~ Hypergeometric(M, K, K): the score of a
    prediction that knows nothing about the image's ranking.
    """
    m = num_patches
    total = math.comb(m, k)
    return sum(math.comb(k, i) * math.comb(m - k, k - i) / total * i / (2 * k - i) for i in range(1, k + 1))


def ermse(pred: torch.Tensor, true: torch.Tensor) -> float:
    """sqrt(mean over images and patches of (Norm(pred) − Norm(true))²); inputs (N, M)."""
    diff = zscore(pred.double()) - zscore(true.double())
    return float(diff.pow(2).mean().sqrt())


def ermse_image_specific(pred: torch.Tensor, true: torch.Tensor, pred_mean: torch.Tensor | None = None,
                         true_mean: torch.Tensor | None = None) -> float:
    """E-RMSE of the maps minus their mean maps: ``ermse(pred − μ̃, true − μ)``; inputs (N, M).

    Args:
        pred: (N, M) predicted attributions Φ̃_y.
        true: (N, M) ground-truth φ.
        pred_mean: (M,) map subtracted from ``pred``; default the mean of ``pred`` over its N images.
        true_mean: (M,) map subtracted from ``true``; pass the domain's mean train φ (the
            study does); default the mean of ``true`` over its N images.
    """
    pred, true = pred.double(), true.double()
    mu_pred = pred.mean(dim=0) if pred_mean is None else pred_mean.double()
    mu_true = true.mean(dim=0) if true_mean is None else true_mean.double()
    return ermse(pred - mu_pred, true - mu_true)


def kendall_tau(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Kendall τ-b per row of (N, M) inputs, vectorised over all patch pairs."""
    a = torch.sign(pred[:, :, None] - pred[:, None, :]).double()
    b = torch.sign(true[:, :, None] - true[:, None, :]).double()
    iu = torch.triu_indices(pred.shape[1], pred.shape[1], offset=1)
    a, b = a[:, iu[0], iu[1]], b[:, iu[0], iu[1]]
    concord = (a * b).sum(dim=1)
    denom = torch.sqrt((a != 0).sum(dim=1).double() * (b != 0).sum(dim=1).double())
    return torch.where(denom > 0, concord / denom.clamp(min=1e-300), torch.zeros_like(concord))


def iou_at_k(pred: torch.Tensor, true: torch.Tensor, k: int) -> torch.Tensor:
    """|top_k(pred) ∩ top_k(true)| / |top_k(pred) ∪ top_k(true)| per row."""
    top_p = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, pred.topk(k, dim=1).indices, True)
    top_t = torch.zeros_like(true, dtype=torch.bool).scatter_(1, true.topk(k, dim=1).indices, True)
    inter = (top_p & top_t).sum(dim=1).double()
    return inter / (2 * k - inter)


@dataclass(frozen=True)
class Scores:
    """Accuracy and explanation scores of one model on one test set."""

    model: str
    accuracy: float
    ermse: float
    kendall: float
    iou1: float
    iou5: float
    iou10: float
    ks: tuple[int, int, int] = (1, 5, 10)
    n: int = 0
    ermse_img: float = float("nan")
    iou_chance: tuple[float, float, float] = (float("nan"),) * 3

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ks"] = list(self.ks)
        out["iou_chance"] = list(self.iou_chance)
        return out


def score(model: str, logits: torch.Tensor | None, labels: torch.Tensor, phi_pred: torch.Tensor,
          phi_true: torch.Tensor, accuracy: float | None = None, *, true_mean: torch.Tensor | None = None,
          pred_mean: torch.Tensor | None = None) -> Scores:
    """All metrics for predicted attributions ``phi_pred`` (N, M) of the labelled class.

    ``true_mean`` / ``pred_mean`` are the mean maps of :func:`ermse_image_specific` (pass the
    domain's mean train φ as ``true_mean``; both default to the evaluated images' means).
    """
    if accuracy is None:
        accuracy = float((logits.argmax(dim=1) == labels).double().mean())
    m = phi_true.shape[1]
    ks = scaled_ks(m)
    return Scores(
        model=model, accuracy=accuracy, ermse=ermse(phi_pred, phi_true),
        kendall=float(kendall_tau(phi_pred, phi_true).mean()),
        iou1=float(iou_at_k(phi_pred, phi_true, ks[0]).mean()),
        iou5=float(iou_at_k(phi_pred, phi_true, ks[1]).mean()),
        iou10=float(iou_at_k(phi_pred, phi_true, ks[2]).mean()),
        ks=ks, n=int(labels.shape[0]),
        ermse_img=ermse_image_specific(phi_pred, phi_true, pred_mean, true_mean),
        iou_chance=tuple(iou_chance(m, k) for k in ks),
    )
