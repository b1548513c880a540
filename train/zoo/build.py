"""The zoo build: every parameter set and supervision of the paper, per domain, in the store.

For each domain and training seed: the head W, θ_ft (α = 1), explanation supervision φ
(Kernel SHAP on the θ_ft model, for every train image plus the val and test images), and
θ_ft* (α < 1, default 0.8). For a backbone without weights (tvdiag's own configs) also θ_base by
contrastive pretraining on the pool splits, with its own ``base_seed``: θ_base is the same for every
training seed.

θ_ft and θ_ft* are a controlled pair (DESIGN.md): the same train images (the val split is
carved out of train and never trained on), the same batch sequence
(:func:`train.loop.batch_plan`, one generator seeded by ``seed``), the same steps and
optimiser, the same augmentation on image and φ (:func:`train.datasets.augment.roll_patches`; off by
default, ``patch_shift = 0``: at M = 16 one patch is a quarter of the image and a cyclic roll
tears the object apart, and φ of a rolled image is only approximately the rolled φ). They
differ in α only, so θ_ft* trained with α = 1 *is* θ_ft, bit for bit. Variants of θ_ft*:

* ``paper`` — from θ_base with the pair's optimiser (``ft``), as the preprint (eq. 4–7);
* ``from-ft`` — continued from θ_ft with ``from_ft`` (lower lr, fewer steps), same images and
  the prefix of the same batch sequence; built with its *twin*, the same continuation at α = 1
  (:meth:`Zoo.twin`, stored as θ_ft* of ``from-ft`` at α = 1), which is its controlled pair.

τ* = θ_ft* − θ_ft for ``paper`` (θ_ft is its α = 1 run) and θ_ft* − θ_twin for ``from-ft``
(``from-ft-raw``: the same θ_ft* against θ_ft; :data:`train.store.VARIANTS`). Artifacts are
content-addressed (:func:`train.store.content_key`) and keyed by seed and variant in the store,
written atomically one by one, so a killed build resumes at the first missing artifact and
nothing is recomputed needlessly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from train import __version__
from train.backbones import Backbone, create_backbone, load_config, read_checkpoint, state_hash
from train.datasets import Domain, domain_for, MINISUITE, split_inputs
from train.datasets.augment import roll_patches
from train.devices import autocast, check_bf16, cpu_state, resolve_device
from train.errors import TvdiagError
from train.explain.gradcam import gradcam_patches
from train.explain.kernelshap import kernel_shap, samples_for
from train.loop import batch_plan, fit, OptimConfig
from train.losses import alpha_loss, check_alpha
from train.model import SelfExplainingCLIP, text_head, visual_state
from train.pretrain import pretrain
from train.store import base_state, check_variant, content_key, has_twin, Store, trained_variant, TWIN_ALPHA
from train.tensorio import dumps, load_tensors, save_tensors
from train.vectors import TaskVector
from train.zoo.config import SHAP_BASELINE, ZooConfig
from train.zoo.plan import ZooPlan
from train.zoo.shipped import copy_shipped, refuse_other_base_seed

log = logging.getLogger(__name__)

STAGES = ("ft", "phi", "ftx")
"""A domain's build in order (:meth:`Zoo.build_stage`): head and θ_ft; φ; θ_ft* (and twins)."""


class Zoo(ZooPlan):
    """Builds (or reuses) the artifacts of one backbone in one store."""
    def __init__(self, store: Store, config: ZooConfig = ZooConfig(), progress: bool = True,
                 data: dict[str, str | Path] | None = None, *, device: str | torch.device | None = None,
                 bf16: bool = False):
        """``device`` (default ``auto``) runs pretraining, fine-tuning and φ; artifacts are written from
        CPU tensors. ``bf16`` autocasts their forwards (CUDA only) and is part of the artifacts' keys."""
        self.device = resolve_device(device)
        self.bf16 = check_bf16(self.device, bf16)
        # φ files are named by the supervision method; the zoo's store reads and writes this one
        self.store = store if store.supervision == config.supervision else replace(store, supervision=config.supervision)
        self.config = config
        self.progress = progress
        self.data = dict(data or {})
        self._domains: dict[str, Domain] = {}
        self._backbone: tuple[Backbone, str] | None = None
        self._base_header: dict | None = None  # the store's θ_base header, when it is read as it is
        self.built: list[Path] = []  # artifacts this object wrote (a sharded build checks each is written once)

    # ------------------------------------------------------------------ data
    def domain(self, name: str) -> Domain:
        """The domain ``name`` loaded at the backbone's input size (:func:`train.datasets.domain_for`)."""
        if name not in self._domains:
            self._domains[name] = domain_for(load_config(self.config.backbone), name, self.data.get(name))
        return self._domains[name]

    def images(self, name: str, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-ready images and labels of a split (the first ``limit`` items; splits are shuffled)."""
        backbone, _ = self.base()
        return split_inputs(backbone.config, self.domain(name), split, limit)

    # ------------------------------------------------------------------ base
    def _base_key(self) -> str:
        cfg = self.config
        payload = {"backbone": cfg.backbone, "pretrained": cfg.pretrained, "seed": cfg.base_seed, "version": 1}
        if cfg.checkpoint:
            payload["checkpoint_hash"] = state_hash(read_checkpoint(cfg.checkpoint))
        elif not cfg.pretrained:
            payload["pretrain"] = asdict(cfg.pretrain)
            payload["data"] = {d: self.domain(d).content_hash for d in MINISUITE}
        return content_key(payload)

    def base(self) -> tuple[Backbone, str]:
        """θ_base (with its text tower) and its hash, from the store, else the repository's shipped copy for this
        key (:mod:`train.zoo.shipped`; not under ``--rebuild base|all``), else pretrained (a backbone without weights)."""
        if self._backbone is not None:
            return self._backbone

        load_config(self.config.backbone)  # unknown names fail before anything is written
        self.store.check_writable()
        cfg = self.config
        key = self._base_key()
        path = self.store.base_path()
        refuse_other_base_seed(self.store, path, cfg.base_seed)
        if self.store.decide(path, key, what="θ_base").usable:
            self._backbone = self.store.load_base()
            return self._backbone
        shipped = self.shipped_base()
        if shipped is not None:  # the repository's θ_base for this key: copied, not pretrained again
            copy_shipped(shipped, path)
            self.built.append(path)
            self._backbone = self.store.load_base()
            return self._backbone
        backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                                   seed=cfg.base_seed)
        provenance = {"key": key, "backbone": cfg.backbone, "pretrained": cfg.pretrained or "",
                      "checkpoint": cfg.checkpoint or "", "seed": cfg.base_seed}
        if not (cfg.checkpoint or cfg.pretrained):
            domains = [self.domain(d) for d in MINISUITE]
            history = pretrain(backbone, domains, cfg.pretrain, seed=cfg.base_seed, progress=self.progress,
                               device=self.device)
            provenance.update(pretrain=dumps(asdict(cfg.pretrain)), pretrain_loss=f"{history.final():.4f}",
                              data=dumps({d.name: d.content_hash for d in domains}))
        self.store.save_base(backbone, provenance)
        self.built.append(path)
        self._backbone = self.store.load_base()
        return self._backbone

    # ------------------------------------------------------------------ heads
    def head(self, name: str) -> tuple[torch.Tensor, float]:
        domain, verdict = self.domain(name), self._head_verdict(name)
        if not verdict.usable:
            backbone, base_hash = self.base()
            head = text_head(backbone.clip, backbone.tokenizer, domain.classnames, domain.templates)
            scale = float(backbone.clip.logit_scale.detach().exp().clamp(max=100))
            self.store.save_head(name, head, scale, {"key": verdict.key, "base_hash": base_hash, "domain": name,
                                                       "dataset_hash": domain.content_hash})
            self.built.append(verdict.path)
        return self.store.load_head(name)

    def model(self, name: str, state: dict[str, torch.Tensor] | None = None) -> SelfExplainingCLIP:
        """The store's model for ``name`` (head built first when missing), θ = ``state`` or θ_base."""
        backbone, _ = self.base()
        self.head(name)
        return self.store.model(name, state, backbone=backbone)

    # ----------------------------------------------------------------- θ_ft
    def _ft_key(self, name: str) -> str:
        base_hash = self.base_hash()
        cfg = self.config
        # data_key: the source's hash, and the val carve's where it is not the stratified one (Domain.data_key)
        return content_key({"base": base_hash, "data": self.domain(name).data_key, "alpha": 1.0,
                            "optim": asdict(cfg.ft), "patch_shift": cfg.patch_shift, "seed": cfg.seed,
                            "max_train": cfg.max_train, "pair": 2, **self._precision()})

    def _precision(self) -> dict:
        """The key entry of bf16 forwards (none for fp32, so fp32 keys are the same on every device)."""
        return {"autocast": "bf16"} if self.bf16 else {}

    def ft(self, name: str) -> TaskVector:
        """τ_ft = θ_ft − θ_base: the pair's α = 1 run (classification only) on the train split."""
        verdict = self._ft_verdict(name)
        path = verdict.path
        base_hash = self.base_hash()
        if verdict.usable:
            return TaskVector.load(path, expect_base=base_hash)
        vector = self.train_ft(name, verdict.key)
        vector.save(path)
        self.built.append(path)
        return vector

    def train_ft(self, name: str, key: str = "") -> TaskVector:
        """θ_ft − θ_base, trained now (no store lookup)."""
        x, y = self.images(name, "train", self.config.max_train)
        return self._fit(name, None, x, y, None, 1.0, self.config.ft, "paper", key, f"θ_ft {name}")

    # ------------------------------------------------------------------- φ
    def shap_samples(self) -> int:
        """Kernel SHAP coalitions per image: ``config.shap_samples``, else ``shap_per_patch`` · M (even)."""
        if self.config.shap_samples is not None:
            return self.config.shap_samples
        cfg = self.base_config()
        return samples_for((cfg.image_size // cfg.patch_size) ** 2, self.config.shap_per_patch)

    def _attr_key(self, name: str) -> str:
        cfg = self.config
        limits = {"val": cfg.max_val, "test": cfg.shap_test, "splits": ["train", "val", "test"]}
        if self.domain(name).split_key:  # φ covers train and val: a grouped carve that moved images keys it even
            limits["split_key"] = self.domain(name).split_key  # from an imported θ_ft (none: the stratified keys)
        if cfg.supervision == "gradcam":
            return content_key({"ft": self._ft_identity(name), "method": "gradcam", **limits,
                                "layer": "last resblock ln_1"})
        return content_key({"ft": self._ft_identity(name), "method": "kernelshap", "samples": self.shap_samples(),
                            **limits, "baseline": 0.0, "seed": cfg.seed, "output": "logit", "paired": True,
                            **self._precision()})

    def attributions(self, name: str) -> dict[str, torch.Tensor]:
        """φ on the θ_ft model (labelled class): every train image θ_ft trains on, val and test images.

        Keys ``train``, ``val``, ``test`` (N, M) and ``<split>_labels``, aligned with the first
        images of each split. Stored under the supervision's own name (``<domain>-kernelshap`` or
        ``<domain>-gradcam``); the store's ``supervision`` tells readers which one to read.
        """
        seed = self.config.seed
        verdict = self._attr_verdict(name)
        key, path = verdict.key, verdict.path
        if verdict.usable:
            return load_tensors(path)[0]
        backbone, base_hash = self.base()
        model = self.model(name, self.ft(name).apply_to(base_state(backbone), base_hash=base_hash)).to(self.device)
        out: dict[str, torch.Tensor] = {}
        limits = {"train": self.config.max_train, "val": self.config.max_val, "test": self.config.shap_test}
        for split, limit in limits.items():
            x, y = self.images(name, split, limit)
            out[split] = self._explain(model, x, y, desc=f"{self.config.supervision} {name}/{split}")
            out[f"{split}_labels"] = y
        method = self.config.supervision
        meta = {"key": key, "base_hash": base_hash, "domain": name, "method": method, "seed": seed,
                "model": "θ_ft (same seed)", "output": "logit of the labelled class",
                "dataset_hash": self.domain(name).content_hash, "tvdiag_version": __version__}
        if method == "kernelshap":
            meta.update(samples=self.shap_samples(), baseline=SHAP_BASELINE, paired="true")
        save_tensors(path, out, meta)
        self.built.append(path)
        return out

    def _explain(self, model: SelfExplainingCLIP, x: torch.Tensor, y: torch.Tensor, desc: str) -> torch.Tensor:
        if self.config.supervision == "gradcam":
            return gradcam_patches(model, x, y).float()
        chunk = 32
        gen = torch.Generator().manual_seed(self.config.seed)
        patch = self.base()[0].config.patch_size
        parts = []
        with torch.no_grad():
            for start in tqdm(range(0, len(x), chunk), desc=desc, disable=not self.progress, leave=False, unit="batch"):
                parts.append(kernel_shap(model, x[start:start + chunk], y[start:start + chunk], patch_size=patch,
                                         n_samples=self.shap_samples(), generator=gen, bf16=self.bf16))
        return torch.cat(parts).float()

    # ----------------------------------------------------------------- θ_ft*
    def _ftx_key(self, name: str, alpha: float, variant: str) -> str:
        optim = self.config.ft if variant == "paper" else self.config.from_ft
        return content_key({"ft": self._ft_identity(name), "attr": self._attr_key(name), "alpha": alpha,
                            "variant": variant, "optim": asdict(optim)})

    def ftx(self, name: str, alpha: float = 0.8, variant: str = "paper") -> TaskVector:
        """τ_ft* = θ_ft* − θ_base of ``variant`` (``paper`` or ``from-ft``; ``from-ft-raw`` reads ``from-ft``'s)."""
        alpha, variant = check_alpha(alpha), trained_variant(variant)
        verdict = self._ftx_verdict(name, alpha, variant)
        path = verdict.path
        base_hash = self.base_hash()
        if verdict.usable:
            return TaskVector.load(path, expect_base=base_hash)
        vector = self.train_ftx(name, alpha, variant, verdict.key)
        if variant == "from-ft" and alpha == TWIN_ALPHA:
            vector.provenance["role"] = "twin: the from-ft continuation at α = 1, the reference of from-ft's τ*"
        vector.save(path)
        self.built.append(path)
        return vector

    def twin(self, name: str) -> TaskVector:
        """θ_twin − θ_base: the ``from-ft`` continuation of θ_ft (same optimiser, batches, seed, steps) at α = 1.

        θ_ft* of ``from-ft`` (α < 1) and the twin differ in α only, so τ* = θ_ft* − θ_twin holds what
        explanation supervision adds and not the continuation's extra classification steps.
        """
        return self.ftx(name, TWIN_ALPHA, "from-ft")

    def train_ftx(self, name: str, alpha: float, variant: str = "paper", key: str = "") -> TaskVector:
        """θ_ft* − θ_base, trained now with L_α on the pair's images and batches (φ built if missing).

        With α = 1 and ``variant="paper"`` this is :meth:`train_ft` step for step; with α = 1 and
        ``from-ft`` it is the twin (:meth:`twin`).
        """
        alpha, variant = check_alpha(alpha), trained_variant(variant)
        phi = self.attributions(name)["train"]
        x, y = self.images(name, "train", self.config.max_train)
        if phi.shape[0] != len(y):
            raise TvdiagError(f"{name}: φ covers {phi.shape[0]} train images, the pair trains on {len(y)}")
        init, optim = None, self.config.ft
        if variant == "from-ft":
            backbone, base_hash = self.base()
            init, optim = self.ft(name).apply_to(base_state(backbone), base_hash=base_hash), self.config.from_ft
        return self._fit(name, init, x, y, phi, alpha, optim, variant, key, f"θ_ft* {name} α={alpha:g} {variant}")

    # --------------------------------------------------------------- training
    def _fit(self, name: str, init: dict[str, torch.Tensor] | None, x: torch.Tensor, y: torch.Tensor,
             phi: torch.Tensor | None, alpha: float, optim: OptimConfig, variant: str, key: str,
             desc: str) -> TaskVector:
        """One run of the pair: minimise L_α from ``init`` (θ_base when None) over :func:`batch_plan`.

        Everything but α, φ, ``init`` and ``optim`` is the pair's: images, batch sequence,
        patch shifts (applied to image and φ alike), seed. With φ the model's ``explain`` pass is
        used (its logits are the same computation as ``forward``); L_α ignores φ when α = 1.
        """
        if len(y) == 0:
            raise TvdiagError(f"{name}: no training images")
        backbone, base_hash = self.base()
        cfg = self.config
        model = self.model(name, init).to(self.device)
        model.train()
        torch.manual_seed(cfg.seed)
        plan = batch_plan(len(y), optim.batch_size, optim.steps, cfg.seed, cfg.patch_shift)
        patch = backbone.config.patch_size

        def step_loss(step: int) -> torch.Tensor:
            batch = plan[step]
            xb, phib = x[batch.index], None if phi is None else phi[batch.index]
            if batch.shifts is not None:
                xb, phib = roll_patches(xb, phib, batch.shifts, patch)
            xb, yb, phib = xb.to(self.device), y[batch.index].to(self.device), None if phib is None else phib.to(self.device)
            with autocast(self.device, self.bf16):
                if phi is None:
                    return alpha_loss(model(xb).float(), None, yb, None, alpha)
                logits, phi_pred = model.explain(xb)
                return alpha_loss(logits.float(), phi_pred.float(), yb, phib, alpha)

        history = fit(model.visual.parameters(), step_loss, optim, desc=desc, progress=self.progress)
        model.eval()
        supervision = "none" if phi is None or alpha == 1 else (
            f"{cfg.supervision} samples={self.shap_samples()}" if cfg.supervision == "kernelshap" else cfg.supervision)
        provenance = {"key": key, "backbone": cfg.backbone_id, "domain": name, "split": "train",
                      "dataset_hash": self.domain(name).content_hash, "seed": cfg.seed, "base_seed": cfg.base_seed,
                      "variant": variant if phi is not None else "", "init": "θ_ft" if init is not None else "θ_base",
                      "alpha": alpha, "steps": optim.steps, "lr": optim.lr, "optim": dumps(asdict(optim)),
                      "patch_shift": cfg.patch_shift, "n_images": len(y), "supervision": supervision,
                      "final_loss": f"{history.final():.4f}", "tvdiag_version": __version__}
        if self.domain(name).split_key:  # a grouped val carve that moved images (none: the stratified carve's bytes)
            provenance["split_key"] = self.domain(name).split_key
        return TaskVector.between(base_state(backbone), cpu_state(visual_state(model)), base_hash, provenance)

    @torch.no_grad()
    def zero_shot_accuracy(self, name: str) -> float:
        """Accuracy of θ_base with the domain's text head on its test split (CLIP zero-shot)."""
        model = self.model(name).to(self.device)
        x, y = self.images(name, "test", self.config.max_test)
        correct, step = 0, self.config.eval_batch
        for start in range(0, len(y), step):
            correct += int((model(x[start:start + step].to(self.device)).argmax(1).cpu() == y[start:start + step]).sum())
        return correct / max(len(y), 1)

    # ------------------------------------------------------------------ build
    def build_domain(self, name: str, alphas: tuple[float, ...] = (0.8,), variants: tuple[str, ...] = ("paper",),
                     explain: bool = True) -> None:
        """Every stage of one domain for this seed (``explain=False``: ``ft`` only). Each artifact is reused
        when fresh or kept when imported; :meth:`plan` refuses before anything of the domain is written.
        The CLI's sharded build (:func:`diag.runtime.shards.build_domains`) runs the stages one by one."""
        self.plan(name, alphas, variants, explain)
        for stage in STAGES[:None if explain else 1]:
            self.build_stage(name, stage, alphas, variants)

    def build_stage(self, name: str, stage: str, alphas: tuple[float, ...] = (0.8,),
                    variants: tuple[str, ...] = ("paper",)) -> None:
        """One of :data:`STAGES` of :meth:`build_domain` (the earlier stages' artifacts are read from the store):
        ``ft`` head and θ_ft, ``phi`` φ, ``ftx`` θ_ft* of every α and variant (and twins). Each stage seeds
        itself, so a stage run by another process gives the same bytes."""
        if stage == "ft":
            self.head(name)
            self.ft(name)
        elif stage == "phi":
            self.attributions(name)
        else:
            for variant in variants:
                for alpha in alphas:
                    self.ftx(name, alpha, variant)
                if has_twin(variant):
                    self.twin(name)

    def build(self, domains: list[str] | None = None, alphas: tuple[float, ...] = (0.8,),
              variants: tuple[str, ...] = ("paper",)) -> dict[str, float]:
        """Build everything for ``domains`` (all of the mini-suite by default) in this process; returns wall times."""
        domains = list(domains or MINISUITE)
        variants = tuple(check_variant(v) for v in variants)
        times: dict[str, float] = {}
        start = time.perf_counter()
        self.base()
        times["base"] = time.perf_counter() - start
        for name in domains:  # every refusal before any domain is written
            self.plan(name, alphas, variants)
        for name in tqdm(domains, desc="zoo", disable=not self.progress, unit="domain"):
            t0 = time.perf_counter()
            self.build_domain(name, alphas, variants)
            times[name] = time.perf_counter() - t0
        times["total"] = time.perf_counter() - start
        return times
