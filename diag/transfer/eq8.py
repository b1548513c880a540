"""Eq. 8 and the one evaluation loop: θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ and its scores.

:func:`transferred_state` is the only place eq. 8 is written; :func:`predict` the one forward
loop (logits and φ̃ in batches), :func:`correct_and_loss` the one labelled-accuracy loop (λ2
grids and every choice on ``val``: per-image correctness, for paired standard errors), :func:`evaluate_state` the scores of a state on the test
split. :func:`pair_seed` is the one seeding rule of a pair's random choices.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import replace

import torch

from diag.runtime.context import TargetSet, Workspace
from diag.transfer.metrics import METRICS, Scores, score
from train.devices import module_device
from train.model import SelfExplainingCLIP, load_visual_state
from train.vectors import TaskVector


def pair_seed(seed: int, source: str, target: str, purpose: str = "") -> int:
    """The one seeding rule: a stable 63-bit integer from (seed, source, target, purpose).

    sha256 of ``"seed|source|target|purpose"``, so it does not depend on Python's hash
    randomisation, on the order pairs are computed in, or on which command asks.
    """
    digest = hashlib.sha256(f"{int(seed)}|{source}|{target}|{purpose}".encode()).hexdigest()
    return int(digest[:15], 16)


def other_source(seed: int, source: str, target: str, candidates: Sequence[str]) -> str | None:
    """The domain whose τ* is the "other source" control of (source, target), or None."""
    others = sorted(set(candidates) - {source, target})
    return random.Random(pair_seed(seed, source, target, "other")).choice(others) if others else None


def transferred_state(ws: Workspace, tau_ft_target: TaskVector, tau_star: TaskVector, lambda1: float,
                      lambda2: float) -> dict:
    """θ̃ = θ_base + λ1·τ_ftᵀ + λ2·τ*ˢ (eq. 8), the only place the sum is written."""
    return (lambda1 * tau_ft_target + lambda2 * tau_star).apply_to(ws.base, base_hash=ws.base_hash)


# --------------------------------------------------------------------------- the one loop


@torch.no_grad()
def predict(model: SelfExplainingCLIP, x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256,
            explain: bool = True):
    """Logits (N, C) and, with ``explain``, the attributions of the labelled class (N, M).

    The one evaluation loop of ``diag``: transfer rows, the study, the tier-2 accuracy
    checks and the Kernel SHAP budget all call it.
    """
    logits, phis = [], []
    device = module_device(model)  # batches go to the model's device, results come back on the CPU
    for start in range(0, len(x), batch):
        if not explain:
            logits.append(model(x[start:start + batch].to(device)).cpu())
            continue
        lg, ph = model.explain(x[start:start + batch].to(device))
        yy = y[start:start + batch].to(device)
        logits.append(lg.cpu())
        phis.append(ph.gather(1, yy[:, None, None].expand(-1, 1, ph.shape[-1])).squeeze(1).cpu())
    return torch.cat(logits), (torch.cat(phis) if explain else None)


def correct_and_loss(ws: Workspace, domain: str, state: dict, images: TargetSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image top-1 correctness (N,) bool, per-image cross-entropy (N,) float64) of θ = ``state`` with
    ``domain``'s head on ``images`` (no φ needed).

    The one labelled-accuracy loop (λ2 grids, the methods' val choices): the accuracy is the
    correctness's mean, its drop against θ_ftᵀ on the same images gets a paired standard error
    (:func:`diag.stats.paired.paired_drop`), and the loss is the quantity the loss model
    λ·gᵀτ + ½λ²R predicts the change of (its paired se: :func:`diag.stats.paired.paired_change`).
    """
    model = ws.model(domain)
    load_visual_state(model, state)
    logits, _ = predict(model, images.x, images.y, explain=False)
    losses = torch.nn.functional.cross_entropy(logits.double(), images.y, reduction="none")
    return logits.argmax(dim=1) == images.y, losses


def evaluate_state(ws: Workspace, tset: TargetSet, state: dict, name: str) -> Scores:
    """Scores of θ = ``state`` on the target's test set (with its stored φ).

    The image-specific E-RMSE subtracts the target's mean train φ of the workspace's seed
    (``true_mean``) and the mean prediction over the test images.
    """
    model = ws.model(tset.name)
    load_visual_state(model, state)
    logits, phi_pred = predict(model, tset.x, tset.y)
    return score(name, logits, tset.y, phi_pred, tset.phi, true_mean=ws.mean_map(tset.name))


def mean_scores(name: str, draws: list[Scores]) -> tuple[Scores, dict[str, float]]:
    """Mean of every metric over ``draws`` and their sample standard deviations (``<metric>_sd``)."""
    out, spread = {}, {}
    for m in METRICS:
        v = torch.tensor([getattr(s, m) for s in draws], dtype=torch.float64)
        out[m] = float(v.mean())
        spread[f"{m}_sd"] = float(v.std()) if len(draws) > 1 else math.nan
    return replace(draws[0], model=name, per_image_corr=None, **out), spread


