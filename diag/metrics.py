"""Explanation and classification metrics of the paper's tables (§6).

* accuracy;
* E-RMSE: sqrt of the explanation loss (eq. 5) averaged per patch,
  ``sqrt(mean_n mean_m (Norm(Φ̃_y) − Norm(φ))²)``, with Norm the z-score over patches.
  Two unrelated z-scored maps score ≈ √2 ≈ 1.414 (E‖a − b‖²/M = 2 for independent
  standardised a, b), identical maps 0, anti-correlated maps up to 2;
* Kendall rank correlation (τ-b) between predicted and true attributions, per image, averaged;
* IoU@K of the top-K patch index sets. The paper uses K = 1, 5, 10 at M = 49 patches; on
  other grids K is scaled to the same fraction of M and rounded up (M = 16 → K = 1, 2, 4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from diag.constants import PAPER_KS, PAPER_M
from train.losses import zscore


def scaled_ks(num_patches: int) -> tuple[int, int, int]:
    """K for IoU@1/5/10 on a grid of ``num_patches``: ceil(K · M / 49), at least 1, at most M."""
    return tuple(max(1, min(num_patches, math.ceil(k * num_patches / PAPER_M))) for k in PAPER_KS)


def ermse(pred: torch.Tensor, true: torch.Tensor) -> float:
    """sqrt(mean over images and patches of (Norm(pred) − Norm(true))²); inputs (N, M)."""
    diff = zscore(pred.double()) - zscore(true.double())
    return float(diff.pow(2).mean().sqrt())


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

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ks"] = list(self.ks)
        return out


def score(model: str, logits: torch.Tensor | None, labels: torch.Tensor, phi_pred: torch.Tensor,
          phi_true: torch.Tensor, accuracy: float | None = None) -> Scores:
    """All metrics for predicted attributions ``phi_pred`` (N, M) of the labelled class."""
    if accuracy is None:
        accuracy = float((logits.argmax(dim=1) == labels).double().mean())
    ks = scaled_ks(phi_true.shape[1])
    return Scores(
        model=model, accuracy=accuracy, ermse=ermse(phi_pred, phi_true),
        kendall=float(kendall_tau(phi_pred, phi_true).mean()),
        iou1=float(iou_at_k(phi_pred, phi_true, ks[0]).mean()),
        iou5=float(iou_at_k(phi_pred, phi_true, ks[1]).mean()),
        iou10=float(iou_at_k(phi_pred, phi_true, ks[2]).mean()),
        ks=ks, n=int(labels.shape[0]),
    )
