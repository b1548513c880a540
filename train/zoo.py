"""The zoo build: every parameter set and supervision of the paper, per domain, in the store.

For each domain: the head W, θ_ft (α = 1), explanation supervision φ (Kernel SHAP on the
θ_ft model, train and test images), θ_ft* (α < 1, default 0.8). For the tiny backbone also
θ_base by contrastive pretraining on the pool splits. Artifacts are content-addressed
(:func:`train.store.content_key`), written atomically one by one, so a killed build resumes
at the first missing artifact and nothing is recomputed needlessly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from train import __version__
from train.augment import random_shift
from train.backbones import Backbone, create_backbone, read_checkpoint, state_hash
from train.data import to_model_input
from train.datasets import MINISUITE, Domain, load_domain
from train.errors import TvdiagError
from train.explain.kernelshap import kernel_shap
from train.loop import OptimConfig, fit
from train.losses import alpha_loss, check_alpha
from train.model import SelfExplainingCLIP, text_head, visual_state
from train.pretrain import PretrainConfig, pretrain
from train.store import Store, base_state, content_key
from train.tensorio import dumps, load_tensors, save_tensors
from train.vectors import TaskVector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooConfig:
    """Everything a zoo build depends on (part of every artifact's content key)."""

    backbone: str = "tiny"
    pretrained: str | None = None
    checkpoint: str | None = None
    pretrain: PretrainConfig = PretrainConfig()
    ft: OptimConfig = OptimConfig(steps=200, lr=1e-3, weight_decay=0.1, warmup=20, batch_size=128)
    ftx: OptimConfig = OptimConfig(steps=200, lr=1e-3, weight_decay=0.1, warmup=20, batch_size=128)
    ft_shift: int = 2
    supervision: str = "kernelshap"
    shap_samples: int = 64
    shap_train: int = 600
    shap_test: int = 400
    max_train: int | None = None
    max_test: int | None = None
    eval_batch: int = 256
    seed: int = 0

    @property
    def backbone_id(self) -> str:
        if self.checkpoint:
            return f"{self.backbone}-ckpt-{Path(self.checkpoint).stem}"
        if self.pretrained:
            return f"{self.backbone}-{self.pretrained}"
        return self.backbone


PRESETS: dict[str, ZooConfig] = {
    "default": ZooConfig(),
    # Grad-CAM supervision (appendix D: the paper's ViT-L/14 ground truth) instead of Kernel SHAP.
    "gradcam": ZooConfig(supervision="gradcam"),
    # A few seconds per domain: for tests and CLI smoke runs.
    "smoke": ZooConfig(
        backbone="tiny",
        pretrain=PretrainConfig(epochs=1, batch_size=64, max_per_domain=64),
        ft=OptimConfig(steps=6, lr=1e-3, warmup=2, batch_size=32),
        ftx=OptimConfig(steps=6, lr=1e-3, warmup=2, batch_size=32),
        shap_samples=32, shap_train=32, shap_test=24, max_train=64, max_test=24, eval_batch=64,
    ),
}


def preset(name: str) -> ZooConfig:
    if name not in PRESETS:
        from train.errors import unknown

        raise unknown("zoo preset", name, PRESETS)
    return PRESETS[name]


class Zoo:
    """Builds (or reuses) the artifacts of one backbone in one store."""

    def __init__(self, store: Store, config: ZooConfig = ZooConfig(), progress: bool = True,
                 data: dict[str, str | Path] | None = None):
        self.store = store
        self.config = config
        self.progress = progress
        self.data = dict(data or {})
        self._domains: dict[str, Domain] = {}
        self._backbone: tuple[Backbone, str] | None = None

    # ------------------------------------------------------------------ data
    def domain(self, name: str) -> Domain:
        if name not in self._domains:
            size = None if self.config.backbone == "tiny" else self._image_size()
            self._domains[name] = load_domain(name, data=self.data.get(name), image_size=size)
        return self._domains[name]

    def _image_size(self) -> int:
        from train.backbones import load_config

        return load_config(self.config.backbone).image_size

    def images(self, name: str, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-ready images and labels of a split (the first ``limit`` items; splits are shuffled)."""
        backbone, _ = self.base()
        part = self.domain(name).split(split)
        n = part.labels.shape[0] if limit is None else min(limit, part.labels.shape[0])
        x = to_model_input(part.images[:n], backbone.config.mean, backbone.config.std, size=backbone.config.image_size)
        return x, part.labels[:n].long()

    # ------------------------------------------------------------------ base
    def _base_key(self) -> str:
        cfg = self.config
        payload = {"backbone": cfg.backbone, "pretrained": cfg.pretrained, "seed": cfg.seed, "version": 1}
        if cfg.checkpoint:
            payload["checkpoint_hash"] = state_hash(read_checkpoint(cfg.checkpoint))
        elif not cfg.pretrained:
            payload["pretrain"] = asdict(cfg.pretrain)
            payload["data"] = {d: self.domain(d).content_hash for d in MINISUITE}
        return content_key(payload)

    def base(self) -> tuple[Backbone, str]:
        """θ_base (with its text tower) and its hash; pretrains the tiny backbone when missing."""
        if self._backbone is not None:
            return self._backbone
        from train.backbones import load_config

        load_config(self.config.backbone)  # unknown names fail before anything is written
        self.store.check_writable()
        cfg = self.config
        key = self._base_key()
        path = self.store.base_path()
        if self.store.is_fresh(path, key):
            self._backbone = self.store.load_base()
            return self._backbone
        backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, seed=cfg.seed)
        provenance = {"key": key, "backbone": cfg.backbone, "pretrained": cfg.pretrained or "",
                      "checkpoint": cfg.checkpoint or "", "seed": cfg.seed}
        if not (cfg.checkpoint or cfg.pretrained):
            domains = [self.domain(d) for d in MINISUITE]
            start = time.perf_counter()
            history = pretrain(backbone, domains, cfg.pretrain, seed=cfg.seed, progress=self.progress)
            provenance.update(pretrain=dumps(asdict(cfg.pretrain)), pretrain_loss=f"{history.final():.4f}",
                              pretrain_seconds=f"{time.perf_counter() - start:.1f}",
                              data=dumps({d.name: d.content_hash for d in domains}))
        self.store.save_base(backbone, provenance)
        self._backbone = self.store.load_base()
        return self._backbone

    # ------------------------------------------------------------------ heads
    def head(self, name: str) -> tuple[torch.Tensor, float]:
        backbone, base_hash = self.base()
        domain = self.domain(name)
        key = content_key({"base": base_hash, "classnames": domain.classnames, "templates": domain.templates})
        path = self.store.head_path(name)
        if not self.store.is_fresh(path, key):
            head = text_head(backbone.clip, backbone.tokenizer, domain.classnames, domain.templates)
            scale = float(backbone.clip.logit_scale.detach().exp().clamp(max=100))
            self.store.save_head(name, head, scale, {"key": key, "base_hash": base_hash, "domain": name,
                                                       "dataset_hash": domain.content_hash})
        return self.store.load_head(name)

    def model(self, name: str, state: dict[str, torch.Tensor] | None = None) -> SelfExplainingCLIP:
        """The store's model for ``name`` (head built first when missing), θ = ``state`` or θ_base."""
        backbone, _ = self.base()
        self.head(name)
        return self.store.model(name, state, backbone=backbone)

    # ----------------------------------------------------------------- θ_ft
    def _ft_key(self, name: str) -> str:
        _, base_hash = self.base()
        cfg = self.config
        return content_key({"base": base_hash, "data": self.domain(name).content_hash, "alpha": 1.0,
                            "optim": asdict(cfg.ft), "shift": cfg.ft_shift, "seed": cfg.seed,
                            "max_train": cfg.max_train})

    def ft(self, name: str) -> TaskVector:
        """τ_ft: fine-tune θ for classification only (α = 1) on all train images, with shifts."""
        key = self._ft_key(name)
        path = self.store.vector_path(name, "ft")
        _, base_hash = self.base()
        if self.store.is_fresh(path, key):
            return TaskVector.load(path, expect_base=base_hash)
        x, y = self.images(name, "train", self.config.max_train)
        vector = self._train(name, x, y, None, alpha=1.0, optim=self.config.ft, shift=self.config.ft_shift,
                             key=key, desc=f"θ_ft {name}")
        vector.save(path)
        return vector

    # ------------------------------------------------------------------- φ
    def _attr_key(self, name: str) -> str:
        cfg = self.config
        if cfg.supervision == "gradcam":
            return content_key({"ft": self._ft_key(name), "method": "gradcam", "train": cfg.shap_train,
                                "test": cfg.shap_test, "layer": "last resblock ln_1"})
        return content_key({"ft": self._ft_key(name), "method": "kernelshap", "samples": cfg.shap_samples,
                            "train": cfg.shap_train, "test": cfg.shap_test, "baseline": 0.0, "seed": cfg.seed,
                            "output": "logit", "paired": True})

    def attributions(self, name: str) -> dict[str, torch.Tensor]:
        """φ (Kernel SHAP or Grad-CAM on the θ_ft model, labelled class) for the first train and test images.

        Stored under the method's name; the store's default attribution file (``kernelshap``)
        is what transfer evaluation reads, so a Grad-CAM zoo uses its own store folder.
        """
        key = self._attr_key(name)
        path = self.store.attribution_path(name, "kernelshap")
        if self.store.is_fresh(path, key):
            return load_tensors(path)[0]
        backbone, base_hash = self.base()
        model = self.model(name, self.ft(name).apply_to(base_state(backbone), base_hash=base_hash))
        out: dict[str, torch.Tensor] = {}
        start = time.perf_counter()
        for split, limit in (("train", self.config.shap_train), ("test", self.config.shap_test)):
            x, y = self.images(name, split, limit)
            out[split] = self._explain(model, x, y, desc=f"{self.config.supervision} {name}/{split}")
            out[f"{split}_labels"] = y
        meta = {"key": key, "base_hash": base_hash, "domain": name, "method": self.config.supervision,
                "samples": self.config.shap_samples, "baseline": "0 (dataset mean after normalisation)",
                "output": "logit of the labelled class", "seconds": f"{time.perf_counter() - start:.1f}",
                "dataset_hash": self.domain(name).content_hash}
        save_tensors(path, out, meta)
        return out

    def _explain(self, model: SelfExplainingCLIP, x: torch.Tensor, y: torch.Tensor, desc: str) -> torch.Tensor:
        if self.config.supervision == "gradcam":
            from train.explain.gradcam import gradcam_patches

            return gradcam_patches(model, x, y).float()
        chunk = 32
        gen = torch.Generator().manual_seed(self.config.seed)
        patch = self.base()[0].config.patch_size
        parts = []
        with torch.no_grad():
            for start in tqdm(range(0, len(x), chunk), desc=desc, disable=not self.progress, leave=False, unit="batch"):
                parts.append(kernel_shap(model, x[start:start + chunk], y[start:start + chunk], patch_size=patch,
                                         n_samples=self.config.shap_samples, generator=gen))
        return torch.cat(parts).float()

    # ----------------------------------------------------------------- θ_ft*
    def _ftx_key(self, name: str, alpha: float) -> str:
        _, base_hash = self.base()
        return content_key({"base": base_hash, "attr": self._attr_key(name), "alpha": alpha,
                            "optim": asdict(self.config.ftx), "seed": self.config.seed})

    def ftx(self, name: str, alpha: float = 0.8) -> TaskVector:
        """τ_ft*: fine-tune from θ_base with L_α (eq. 4) on the images that have φ, no augmentation."""
        alpha = check_alpha(alpha)
        key = self._ftx_key(name, alpha)
        path = self.store.vector_path(name, "ftx", alpha)
        _, base_hash = self.base()
        if self.store.is_fresh(path, key):
            return TaskVector.load(path, expect_base=base_hash)
        phi = self.attributions(name)
        x, y = self.images(name, "train", phi["train"].shape[0])
        vector = self._train(name, x, y, phi["train"], alpha=alpha, optim=self.config.ftx, shift=0, key=key,
                             desc=f"θ_ft* {name} α={alpha:g}")
        vector.save(path)
        return vector

    # --------------------------------------------------------------- training
    def _train(self, name, x, y, phi, alpha, optim: OptimConfig, shift: int, key: str, desc: str) -> TaskVector:
        if len(y) == 0:
            raise TvdiagError(f"{name}: no training images")
        backbone, base_hash = self.base()
        model = self.model(name)
        model.train()
        gen = torch.Generator().manual_seed(self.config.seed)
        torch.manual_seed(self.config.seed)
        batch = min(optim.batch_size, len(y))

        def step_loss(step: int) -> torch.Tensor:
            idx = torch.randint(0, len(y), (batch,), generator=gen)
            xb = random_shift(x[idx], shift, gen) if shift else x[idx]
            if alpha < 1:
                logits, phi_pred = model.explain(xb)
                return alpha_loss(logits, phi_pred, y[idx], phi[idx], alpha)
            return alpha_loss(model(xb), None, y[idx], None, alpha)

        history = fit(model.visual.parameters(), step_loss, optim, desc=desc, progress=self.progress)
        model.eval()
        domain = self.domain(name)
        provenance = {"key": key, "backbone": self.config.backbone_id, "domain": name,
                      "dataset_hash": domain.content_hash, "alpha": alpha, "steps": optim.steps,
                      "optim": dumps(asdict(optim)), "seed": self.config.seed, "shift": shift,
                      "n_images": len(y), "final_loss": f"{history.final():.4f}",
                      "seconds": f"{history.seconds:.1f}", "tvdiag_version": __version__,
                      "supervision": "none" if alpha == 1 else f"kernelshap samples={self.config.shap_samples}"}
        return TaskVector.between(base_state(backbone), visual_state(model), base_hash, provenance)

    @torch.no_grad()
    def zero_shot_accuracy(self, name: str) -> float:
        """Accuracy of θ_base with the domain's text head on its test split (CLIP zero-shot)."""
        model = self.model(name)
        x, y = self.images(name, "test", self.config.max_test)
        correct = 0
        for start in range(0, len(y), self.config.eval_batch):
            correct += int((model(x[start:start + self.config.eval_batch]).argmax(1) == y[start:start + self.config.eval_batch]).sum())
        return correct / max(len(y), 1)

    # ------------------------------------------------------------------ build
    def build(self, domains: list[str] | None = None, alphas: tuple[float, ...] = (0.8,)) -> dict[str, float]:
        """Build everything for ``domains`` (all of the mini-suite by default); returns wall times."""
        domains = list(domains or MINISUITE)
        times: dict[str, float] = {}
        start = time.perf_counter()
        self.base()
        times["base"] = time.perf_counter() - start
        for name in tqdm(domains, desc="zoo", disable=not self.progress, unit="domain"):
            t0 = time.perf_counter()
            self.head(name)
            self.ft(name)
            self.attributions(name)
            for alpha in alphas:
                self.ftx(name, alpha)
            times[name] = time.perf_counter() - t0
        times["total"] = time.perf_counter() - start
        return times
