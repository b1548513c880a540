"""Figure 5: Kernel SHAP with a budget of P perturbations against the proposed model's one forward pass."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from diag.constants import PAPER_ALPHA, PAPER_LAMBDA1, PAPER_LAMBDA2
from diag.runtime.context import Workspace
from diag.transfer.eq8 import predict, transferred_state
from diag.transfer.metrics import score
from train.errors import DataError
from train.explain.kernelshap import kernel_shap
from train.model import load_visual_state
from train.store import Store

KS_FILE = "kernelshap_budget.csv"
KS_BUDGETS: tuple[int, ...] = (50, 100, 200, 300, 500, 1000)


def _check(budgets: Sequence[int], n_images: int, source: str, target: str) -> list[int]:
    budgets = [int(b) for b in budgets]
    if not budgets or any(b < 2 or b % 2 for b in budgets):
        raise DataError(f"Kernel SHAP budgets must be even integers >= 2 (paired sampling), got {budgets}")
    if n_images < 1:
        raise DataError(f"n_images must be positive, got {n_images}")
    if source == target:
        raise DataError(f"source and target are both '{source}'")
    return budgets


def kernelshap_budget(store: Store | Workspace, target: str, source: str, budgets: Sequence[int] = KS_BUDGETS,
                      n_images: int = 32, alpha: float = PAPER_ALPHA, lambda1: float = PAPER_LAMBDA1,
                      lambda2: float = PAPER_LAMBDA2, seed: int = 0, data: str | Path | None = None) -> pd.DataFrame:
    """Figure 5: Kernel SHAP with P perturbations on θ_ftᵀ vs the proposed model's one forward pass.

    Both are scored against the stored ground truth φ (Kernel SHAP on θ_ftᵀ with the zoo's
    number of samples) on the first ``n_images`` test images of ``target``. The proposed
    model is θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ. Note that Kernel SHAP with P equal to the zoo's
    sample count and the same seed reproduces the ground truth exactly, and large P
    converges to the exact Shapley values, not to the (noisy) stored φ.

    Returns:
        One row per method and budget: ``method`` (``kernelshap`` / ``proposed``),
        ``n_perturbations`` (NaN for proposed), ``ermse``, ``iou1``, ``kendall``, ``wall_s``
        (seconds for all ``n_images``), ``n_images``, ``target``, ``source``.
    """

    budgets = _check(budgets, n_images, source, target)
    ws = store if isinstance(store, Workspace) else Workspace(store, alpha, {target: data} if data else None)
    tset = ws.target_set(target, "test")
    n = min(n_images, tset.y.shape[0])
    x, y, phi_true = tset.x[:n], tset.y[:n], tset.phi[:n]
    model = ws.model(target)
    load_visual_state(model, ws.state(ws.vector(target, "ft")))
    rows = []
    for p in budgets:
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            phi = kernel_shap(model, x, y, patch_size=ws.backbone.config.patch_size, n_samples=p, generator=gen)
        wall = time.perf_counter() - t0
        s = score(f"kernelshap P={p}", None, y, phi, phi_true, accuracy=float("nan"))
        rows.append({"method": "kernelshap", "n_perturbations": p, "ermse": s.ermse, "iou1": s.iou1,
                     "kendall": s.kendall, "wall_s": wall})
    load_visual_state(model, transferred_state(ws, ws.vector(target, "ft"), ws.vector(source, "star"), lambda1,
                                               lambda2))
    t0 = time.perf_counter()
    logits, phi = predict(model, x, y)
    wall = time.perf_counter() - t0
    s = score("proposed", logits, y, phi, phi_true)
    rows.append({"method": "proposed", "n_perturbations": float("nan"), "ermse": s.ermse, "iou1": s.iou1,
                 "kendall": s.kendall, "wall_s": wall})
    out = pd.DataFrame(rows)
    out["n_images"], out["target"], out["source"], out["lambda2"], out["alpha"] = n, target, source, lambda2, ws.alpha
    return out
