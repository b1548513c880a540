"""One small optimisation loop (AdamW, linear warm-up + cosine decay, gradient clipping).

The loop knows nothing about the model beyond a loss: it receives the parameters to
optimise and a ``step_loss(step) -> loss`` closure that draws its own batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine schedule settings (task_vectors recipe scaled down)."""

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 30
    grad_clip: float = 1.0
    batch_size: int = 128


@dataclass
class FitHistory:
    """Loss per step and the wall time of the run."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def final(self, window: int = 20) -> float:
        tail = self.losses[-window:]
        return sum(tail) / max(len(tail), 1)


@dataclass(frozen=True)
class Batch:
    """One step's draw: image indices (with replacement) and per-image patch shifts (dy, dx) or None."""

    index: torch.Tensor
    shifts: torch.Tensor | None


def batch_plan(n: int, batch_size: int, steps: int, seed: int, max_shift: int = 0) -> list[Batch]:
    """The batch sequence of a training run, drawn up front from one generator seeded by ``seed``.

    Step t draws ``min(batch_size, n)`` indices uniformly with replacement, then, when
    ``max_shift > 0``, a shift in {−max_shift, …, max_shift}² patches per image. It depends on
    (n, batch size, steps, seed, max_shift) only — never on α or on φ — so θ_ft and θ_ft* of a
    controlled pair see the same images in the same order with the same shifts, and a shorter
    run with the same batch size sees a prefix of a longer one's sequence.
    """
    gen = torch.Generator().manual_seed(int(seed))
    size = min(batch_size, n)
    plan = []
    for _ in range(steps):
        index = torch.randint(0, n, (size,), generator=gen)
        shifts = torch.randint(-max_shift, max_shift + 1, (size, 2), generator=gen) if max_shift > 0 else None
        plan.append(Batch(index, shifts))
    return plan


def cosine_lr(step: int, cfg: OptimConfig) -> float:
    """lr at ``step``: linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(params: Iterable[torch.nn.Parameter], step_loss: Callable[[int], torch.Tensor], cfg: OptimConfig,
        desc: str = "train", progress: bool = True) -> FitHistory:
    """Minimise ``step_loss`` over ``params`` for ``cfg.steps`` steps."""
    import time

    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    history = FitHistory()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        history.losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history.final(10):.3f}")
    history.seconds = time.perf_counter() - start
    return history
