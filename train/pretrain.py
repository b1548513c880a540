"""θ_base for a backbone without weights (tvdiag's own configs, ``tiny`` and ``micro``): short CLIP-style
contrastive pretraining on the suite's pool splits.

No pretrained weights can be downloaded, so such a model learns image–text alignment
from the mini-suite's ``pool`` splits (disjoint from train/test) with captions made of
prompt templates and class names. Captions of the same class name are positives of each
other (:func:`train.losses.multi_positive_contrastive`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.datasets.augment import random_shift
from train.backbones import Backbone
from train.datasets.pixels import to_model_input
from train.datasets import Domain
from train.errors import DataError
from train.loop import FitHistory, OptimConfig, fit
from train.losses import multi_positive_contrastive


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of the contrastive pretraining."""

    epochs: int = 25
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    max_shift: int = 2
    max_per_domain: int | None = None


def pretrain(backbone: Backbone, domains: list[Domain], cfg: PretrainConfig = PretrainConfig(), seed: int = 0,
             progress: bool = True, device: torch.device | str = "cpu") -> FitHistory:
    """Contrastively train both towers of ``backbone`` in place on the pool splits of ``domains``.

    The batches are drawn on the CPU (one generator) and trained on ``device``; the backbone
    is back on the CPU afterwards.
    """
    images, groups, caption_ids, caption_tokens = [], [], [], []
    names: dict[str, int] = {}
    offset = 0
    for domain in domains:
        split = domain.split("pool")
        n = split.labels.shape[0] if cfg.max_per_domain is None else min(cfg.max_per_domain, split.labels.shape[0])
        images.append(to_model_input(split.images[:n], backbone.config.mean, backbone.config.std,
                                     size=backbone.config.image_size))
        # one token row per (class, template) of this domain
        texts = [t.format(c=c) for c in domain.classnames for t in domain.templates]
        caption_tokens.append(backbone.tokenizer(texts))
        labels = split.labels[:n].long()
        n_t = len(domain.templates)
        caption_ids.append(offset + labels * n_t)  # first template row of the class; a template is added per step
        groups.append(torch.tensor([names.setdefault(domain.classnames[int(c)], len(names)) for c in labels]))
        offset += len(texts)
    if not images:
        raise DataError("pretraining needs at least one domain with a pool split")
    n_templates = torch.cat([torch.full((len(ids),), len(d.templates)) for ids, d in zip(caption_ids, domains)])
    x_all, g_all, c_all = torch.cat(images), torch.cat(groups), torch.cat(caption_ids)
    tokens = torch.cat(caption_tokens)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps_per_epoch = max(1, len(x_all) // cfg.batch_size)
    optim = OptimConfig(steps=cfg.epochs * steps_per_epoch, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup=max(1, steps_per_epoch), batch_size=cfg.batch_size)
    device = torch.device(device)
    clip = backbone.clip.to(device)
    clip.train()

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        tpl = (torch.rand(cfg.batch_size, generator=gen) * n_templates[idx]).long()
        x = random_shift(x_all[idx], cfg.max_shift, gen).to(device)
        img = clip.encode_image(x)
        txt = clip.encode_text(tokens[c_all[idx] + tpl].to(device))
        return multi_positive_contrastive(img, txt, g_all[idx].to(device), clip.logit_scale.exp().clamp(max=100))

    history = fit(clip.parameters(), step_loss, optim, desc="pretrain θ_base", progress=progress)
    clip.to("cpu").eval()
    return history
