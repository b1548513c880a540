"""``python -m diag.bench.device_check``: the real-size path on a GPU, measured, as one JSON line.

Where CUDA exists it builds an open_clip ViT-B-32 with random weights (224 px, M = 49 patches,
the ≈ 88M-parameter vision tower, no download) as a self-explaining model with a random
10-class head and measures, on that device:

* ``finetune_images_per_s`` — AdamW steps of L_α (α = 0.8, random φ targets; the zoo's loss,
  ``--bf16`` autocasts the forwards);
* ``forward_images_per_s`` — raw forwards (no grad) and ``kernelshap_images_per_s`` — Kernel
  SHAP at 500 coalitions per image (paired; + ∅ and N = 502 forwards per image), with
  ``kernelshap_forward_ratio`` = forward rate ÷ SHAP rate (≈ 502 when SHAP is forward-bound);
* ``hvp_over_grad`` — one Hessian-vector product of L_cls over every parameter of the tower
  (:class:`diag.curvature.operators.HessianOperator`, fp32, its engine chosen by timing, warm:
  after a first product) over one gradient of the same loss on the same batch in the same
  attention mode (medians of 3);
* ``peak_memory_gb`` — peak CUDA memory allocated (peak RSS on the CPU).

Without CUDA it prints one JSON line saying so and exits 0. ``--cpu-smoke`` runs the same
code on the CPU with the ``tiny`` backbone and small sizes (seconds), for tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from diag.curvature.operators.attention import curvature_mode
from diag.curvature.operators import HessianOperator
from train.backbones import build_clip, load_config
from train.devices import autocast, check_bf16, resolve_device, synchronize
from train.errors import TvdiagError
from train.explain.kernelshap import kernel_shap
from train.loop import fit, OptimConfig
from train.losses import alpha_loss
from train.model import SelfExplainingCLIP


@dataclass(frozen=True)
class CheckSize:
    """Sizes of one check (the real one, or the CPU smoke one)."""
    backbone: str = "ViT-B-32"
    ft_batch: int = 64
    ft_steps: int = 10
    fwd_batch: int = 256
    fwd_repeats: int = 5
    shap_images: int = 16
    shap_samples: int = 500
    shap_batch: int = 1024
    hvp_batch: int = 32
    n_classes: int = 10


REAL = CheckSize()
SMOKE = CheckSize(backbone="tiny", ft_batch=8, ft_steps=2, fwd_batch=16, fwd_repeats=2, shap_images=2,
                  shap_samples=64, shap_batch=132, hvp_batch=4)


def _model(size: CheckSize, device: torch.device):
    """A random-weight self-explaining CLIP of ``size.backbone`` on ``device``, and its config."""
    config = load_config(size.backbone)
    torch.manual_seed(0)
    visual = build_clip(config).visual  # random weights: nothing is downloaded
    gen = torch.Generator().manual_seed(0)
    head = F.normalize(torch.randn(visual.proj.shape[1], size.n_classes, generator=gen), dim=0)
    return SelfExplainingCLIP(visual, head, 100.0).to(device), config


def _timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _finetune_rate(model, x, y, phi, size: CheckSize, device, bf16: bool) -> float:
    """Images/s of AdamW steps on L_α (α = 0.8), after one warm-up step."""
    def step_loss(_step: int) -> torch.Tensor:
        with autocast(device, bf16):
            logits, phi_pred = model.explain(x)
        return alpha_loss(logits.float(), phi_pred.float(), y, phi, 0.8)

    model.train()
    fit(model.visual.parameters(), step_loss, OptimConfig(steps=1, warmup=1), progress=False)
    seconds = _timed(lambda: fit(model.visual.parameters(), step_loss,
                                 OptimConfig(steps=size.ft_steps, warmup=1), progress=False), device)
    model.eval()
    return size.ft_steps * len(y) / seconds


def _forward_and_shap_rates(model, x, y, patch: int, size: CheckSize, device, bf16: bool) -> tuple[float, float]:
    """Images/s of raw forwards and of Kernel SHAP at ``size.shap_samples`` coalitions."""
    with torch.no_grad(), autocast(device, bf16):
        model(x)  # warm-up
        fwd = _timed(lambda: [model(x) for _ in range(size.fwd_repeats)], device)
    xs, ys = x[:size.shap_images], y[:size.shap_images]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        shap = _timed(lambda: kernel_shap(model, xs, ys, patch_size=patch, n_samples=size.shap_samples,
                                          batch_size=size.shap_batch, generator=gen, bf16=bf16), device)
    return size.fwd_repeats * len(y) / fwd, len(ys) / shap


def _hvp_and_grad_seconds(model, x, y, device) -> tuple[float, float, int, str]:
    """Median seconds of one warm HVP and of one gradient of L_cls over every tower parameter.

    The gradient runs in the operator's own attention mode (math SDPA kernel, eval), so the
    ratio measures the product, not the attention kernel.
    """

    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        with curvature_mode():
            torch.autograd.grad(F.cross_entropy(model(x), y), params)

    grad()
    grads = [_timed(grad, device) for _ in range(3)]
    op = HessianOperator(model, [(x, y)])
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(op.shape[0], generator=gen).to(device) for _ in range(4)]
    op @ vs[0]  # warm: engine choice and the kept first-order graph
    hvps = [_timed(lambda v=v: op @ v, device) for v in vs[1:]]
    return statistics.median(hvps), statistics.median(grads), op.shape[0], op.engine


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_check(size: CheckSize, device: torch.device, bf16: bool = False) -> dict:
    """Build the model, run the four measurements on ``device`` and return the JSON record."""
    start = time.perf_counter()
    check_bf16(device, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, config = _model(size, device)
    gen = torch.Generator().manual_seed(1)
    side, patch = config.image_size, config.patch_size
    n = max(size.ft_batch, size.fwd_batch, size.hvp_batch, size.shap_images)
    x = torch.randn(n, 3, side, side, generator=gen).to(device)
    y = torch.randint(0, size.n_classes, (n,), generator=gen).to(device)
    m = (side // patch) ** 2
    phi = torch.randn(size.ft_batch, m, generator=gen).to(device)
    ft = _finetune_rate(model, x[:size.ft_batch], y[:size.ft_batch], phi, size, device, bf16)
    fwd, shap = _forward_and_shap_rates(model, x[:size.fwd_batch], y[:size.fwd_batch], patch, size, device, bf16)
    hvp, grad, n_params, engine = _hvp_and_grad_seconds(model, x[:size.hvp_batch], y[:size.hvp_batch], device)
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "backbone": size.backbone, "image_size": side, "patches": m, "n_params": n_params,
            "bf16": bf16, "finetune_images_per_s": ft, "forward_images_per_s": fwd, "kernelshap_images_per_s": shap,
            "kernelshap_samples": size.shap_samples, "kernelshap_forward_ratio": fwd / shap,
            "hvp_seconds": hvp, "grad_seconds": grad, "hvp_over_grad": hvp / grad,
            "hvp_engine": engine,
            "peak_memory_gb": _peak_memory_gb(device), "seconds": time.perf_counter() - start,
            "sizes": asdict(size)}


def main(argv: list[str] | None = None) -> int:
    """Print one JSON line: the measurements, or why none were taken (exit 0 either way)."""
    parser = argparse.ArgumentParser(prog="python -m diag.bench.device_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N (default auto)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of fine-tuning and Kernel SHAP forwards")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code on the CPU at a tiny size (tests)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        record = {"status": "cpu-smoke", **run_check(SMOKE, torch.device("cpu"), args.bf16)}
    elif not torch.cuda.is_available() and args.device in ("auto", "cuda"):
        record = {"status": "skipped", "reason": "no CUDA GPU on this machine (torch.cuda.is_available() is False)",
                  "torch": torch.__version__}
    else:
        record = {"status": "ok", **run_check(REAL, resolve_device(args.device), args.bf16)}
    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TvdiagError as err:
        print(f"device_check: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
