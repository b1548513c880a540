"""What the zoo builds and how: :class:`ZooConfig` (backbone, optimisers, supervision, seeds) and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from train.datasets.registry import env_seed
from train.errors import unknown
from train.loop import OptimConfig
from train.pretrain import PretrainConfig


#: θ_base's seed when a config does not name one (the full-seed axis; see ``$TVDIAG_SPLIT_SEED`` for the splits).
BASE_SEED_ENV = "TVDIAG_BASE_SEED"

SHAP_BASELINE = "0 in normalised input space = the backbone's per-channel normalisation mean (not a data set mean)"


@dataclass(frozen=True)
class ZooConfig:
    """Everything a zoo build depends on (part of every artifact's content key).

    Attributes:
        backbone, pretrained, checkpoint: the backbone and where θ_base comes from.
        pretrain: θ_base's contrastive pretraining, for a backbone with neither ``pretrained`` nor
            ``checkpoint`` weights (tvdiag's own configs, ``tiny`` and ``micro``, start from random weights).
        ft: optimiser of the controlled pair: θ_ft and θ_ft* of the ``paper`` variant.
        from_ft: optimiser of θ_ft* of the ``from-ft`` variant (initialised at θ_ft).
        patch_shift: whole-patch shifts of the pair, at most this many patches each way (0: none).
        supervision: ``kernelshap`` or ``gradcam``.
        shap_samples: Kernel SHAP coalitions per image; None = ``shap_per_patch`` · M, even
            (:func:`train.explain.kernelshap.samples_for`).
        shap_per_patch: coalitions per patch when ``shap_samples`` is None: the preprint's
            density is ≈ 10 (500 at M = 49; 160 at M = 16). The ``default`` preset uses 4
            (64 at M = 16, 196 at M = 49) to fit the first-run budget; ``dense`` uses 10.
        shap_test: test images with φ (the first ones of the split).
        max_train, max_val, max_test: use only the first images of a split (None: all).
        eval_batch: batch size of evaluation forwards.
        seed: training seed — the pair's batch sequence and Kernel SHAP's coalitions.
        base_seed: θ_base's seed (initialisation and pretraining), fixed across training seeds;
            default ``$TVDIAG_BASE_SEED``, else 0. With ``$TVDIAG_SPLIT_SEED`` it makes the full-seed
            axis: one store per (base seed, split seed), every training seed inside it.
    """

    backbone: str = "tiny"
    pretrained: str | None = None
    checkpoint: str | None = None
    pretrain: PretrainConfig = PretrainConfig()
    ft: OptimConfig = OptimConfig(steps=200, lr=1e-3, weight_decay=0.1, warmup=20, batch_size=128)
    from_ft: OptimConfig = OptimConfig(steps=150, lr=3e-4, weight_decay=0.1, warmup=15, batch_size=128)
    patch_shift: int = 0
    supervision: str = "kernelshap"
    shap_samples: int | None = None
    shap_per_patch: float = 10.0
    shap_test: int = 400
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    eval_batch: int = 256
    seed: int = 0
    base_seed: int = field(default_factory=lambda: env_seed(BASE_SEED_ENV))

    @property
    def backbone_id(self) -> str:
        if self.checkpoint:
            return f"{self.backbone}-ckpt-{Path(self.checkpoint).stem}"
        if self.pretrained:
            return f"{self.backbone}-{self.pretrained}"
        return self.backbone


PRESETS: dict[str, ZooConfig] = {
    # ≈ 4 Kernel SHAP coalitions per patch: the first run of the README stays within ~15 min on 2 cores.
    "default": ZooConfig(shap_per_patch=4.0),
    # The preprint's Kernel SHAP density (≈ 10 per patch; 2.5x the φ cost of the default).
    "dense": ZooConfig(shap_per_patch=10.0),
    # Grad-CAM supervision (appendix D: the paper's ViT-L/14 ground truth) instead of Kernel SHAP.
    "gradcam": ZooConfig(supervision="gradcam"),
    # Smoke all the way: the micro backbone (25k vision parameters), a few images and steps per domain, and (in
    # diag) small curvature settings; for trying things out, tests and CLI smoke runs. The micro model is cheap
    # enough for the pretraining and fine-tuning steps that lift its θ_ft off zero test accuracy (a defined
    # accuracy ratio for the ranker to fit).
    "smoke": ZooConfig(
        backbone="micro",
        pretrain=PretrainConfig(epochs=4, batch_size=64, max_per_domain=128),
        ft=OptimConfig(steps=30, lr=3e-3, warmup=3, batch_size=32),
        from_ft=OptimConfig(steps=4, lr=3e-4, warmup=1, batch_size=32),
        shap_samples=32, shap_test=24, max_train=64, max_val=24, max_test=24, eval_batch=64,
    ),
    # Smoke at real size (ViT-B/32, 224 px, M = 49) on CPU: a few images and steps, a chain in ~2 min.
    "vitb-smoke": ZooConfig(
        backbone="ViT-B-32",
        ft=OptimConfig(steps=2, lr=1e-4, warmup=1, batch_size=4),
        from_ft=OptimConfig(steps=1, lr=3e-5, warmup=1, batch_size=4),
        shap_samples=4, shap_test=2, max_train=4, max_val=2, max_test=2, eval_batch=8,
    ),
}


def preset(name: str) -> ZooConfig:
    """The preset ``name``, with θ_base's seed read from ``$TVDIAG_BASE_SEED`` now (not when the presets were made)."""
    if name not in PRESETS:
        raise unknown("zoo preset", name, PRESETS)
    return replace(PRESETS[name], base_seed=env_seed(BASE_SEED_ENV))
