"""The preprint's constants, written once (every module imports them from here).

* λ grid of Figure 3: λ2 ∈ {0.4, 0.5, …, 1.2};
* eq. 8 defaults: λ1 = 1 (the target's own task vector at full strength), λ2 = 0.7;
* α = 0.8 of L_α = α·L_cls + (1 − α)·L_exp (eq. 4) for θ_ft*;
* IoU@K with K = 1, 5, 10 at M = 49 patches (ViT-B/32 at 224 px), scaled to other grids
  by :func:`diag.transfer.metrics.scaled_ks`;
* Table 1 of the preprint (ViT-B/32, ImageNet+X source, mean over 10 targets).

Decision defaults that are not the paper's but shared by every command also live here:
the accuracy budget of λ2 choices and the "kept ≥ 90 % of θ_ftᵀ's accuracy" headline rule.
"""

from __future__ import annotations

LAMBDA_GRID: tuple[float, ...] = tuple(round(0.4 + 0.1 * i, 1) for i in range(9))  # 0.4, 0.5, …, 1.2
PAPER_LAMBDA1 = 1.0
PAPER_LAMBDA2 = 0.7
PAPER_ALPHA = 0.8
PAPER_M = 49
PAPER_KS: tuple[int, int, int] = (1, 5, 10)

#: Preprint Table 1: row label → (accuracy, E-RMSE).
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "zero-shot θ_base": (0.475, 1.508), "θ_ftˢ": (0.379, 1.528), "θ_ft*ˢ": (0.353, 1.149),
    "θ_ftᵀ": (0.890, 1.562), "proposed": (0.886, 1.125), "θ_ft*ᵀ (upper bound)": (0.909, 1.028),
}

#: Draws of the random-direction control (each seeded per (seed, source, target, draw)).
RANDOM_DRAWS = 5
#: Default accuracy-drop budget (relative to θ_ftᵀ) of λ2 choices and verdicts.
DEFAULT_MAX_ACC_DROP = 0.05
#: Headline rule: a transfer "keeps" accuracy at ≥ this fraction of θ_ftᵀ's.
KEEP_ACCURACY = 0.9
#: Labelled target images used by tier-2 accuracy checks (read from the ``val`` split).
CHECK_IMAGES = 400
#: Default level of the prediction intervals (jackknife+ over held-out targets) of rank-sources and screen.
PREDICTION_LEVEL = 0.8
#: The split every choice reads (λ2, verdicts); ``test`` is only ever scored.
CHOICE_SPLIT = "val"
