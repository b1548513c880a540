"""Curvature benchmark: gradient vs Hessian-vector product, ours vs PyHessian and curvlinops.

For each model (a tiny open_clip ViT and a ViT-B/32-shaped one with random weights,
each with a fixed random cosine head and cross-entropy on random labels) and one
fixed batch, in one process and one run, it times

* ``grad``: ``torch.autograd.grad`` of the mean loss w.r.t. the selected parameters
  (the normal training gradient, default attention kernels);
* ``hvp[engine]``: ``HessianOperator(..., engine=e) @ v`` for each engine (a full
  HVP from scratch: forward, gradient and its directional derivative);
* ``pyhessian``: PyHessian's ``dataloader_hv_product`` (also a full HVP from
  scratch: forward, ``backward(create_graph=True)``, second backward) and, for
  reference, its single-batch path that reuses one retained graph for every product
  (``pyhessian_cached_hvp_s``: only the second backward — not comparable per HVP);
* ``curvlinops``: ``HessianLinearOperator @ v`` (jvp of jacrev).

Times are medians over ``repeats`` after one warm-up call (the warm-up call is also
the memory measurement; the gradient gets one extra unmeasured first call). Peak
memory is the extra memory a call needs above what is already resident (model, batch, operator): on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the call; on CPU the
growth of the process's peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, with ``malloc_trim`` first so freed heap pages are given
back and must be faulted in again) — Linux only, otherwise ``None``. Ratios are
computed from numbers measured in the same run on the same batch; ``hvp_kept_over_grad``
and the estimator ratios (:mod:`diag.bench.estimators`) are medians of
per-round ratios of calls made back to back (at least 3 rounds), robust on a busy machine.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diag.bench.estimators import (bench_estimators, format_estimator_lines, load_average, median_ratio, rounds,
                                   store_estimator_row)
from diag.curvature.operators.attention import curvature_mode
from diag.curvature.backends import _keep_training_flag, _only_requires_grad, CurvlinopsHessian
from diag.curvature.operators import ENGINES, HessianOperator
from diag.curvature.params import select_params
from train.backbones import create_backbone
from train.errors import unknown

__all__ = ["BENCH_MODELS", "bench_main", "format_bench_table", "run_curvature_bench"]

log = logging.getLogger(__name__)

BENCH_MODELS = ("tiny-vit", "vit-b-32")
GOALS = {"hvp_over_grad": 2.5, "hvp_kept_over_grad": 2.5, "block8_over_grad": 2.5, "pyhessian_over_ours": 1.5,
         "peak_mem_over_grad": 2.5, "pyhessian_over_ours_trace": 1.5, "pyhessian_over_ours_trace_equal_accuracy": 1.5,
         "pyhessian_over_ours_eig": 1.5, "pyhessian_over_ours_eig_gradient_start": 1.5}
"""Goals of the curvature benchmark: ratios ``*_over_grad`` at most, ``pyhessian_over_*`` at least these values."""
RATIOS = ("hvp_over_grad", "hvp_kept_over_grad", "block8_over_grad", "block8_batched_over_loop", "pyhessian_over_ours",
          "curvlinops_over_ours", "peak_mem_over_grad", "pyhessian_over_ours_trace",
          "pyhessian_over_ours_trace_equal_accuracy", "pyhessian_over_ours_eig", "pyhessian_over_ours_eig_gradient_start",
          "top_eig_rel_diff")
"""The ratios a row also lists under ``ratios`` (times measured in the same run: robust on a busy machine)."""


class _CosineHead(nn.Module):
    """``logits = scale · normalize(visual(x)) @ Wᵀ`` with a fixed random ``W`` (buffer)."""
    def __init__(self, visual: nn.Module, embed_dim: int, classes: int = 10, scale: float = 100.0) -> None:
        super().__init__()
        self.visual = visual
        g = torch.Generator().manual_seed(0)
        self.register_buffer("W", F.normalize(torch.randn(classes, embed_dim, generator=g), dim=-1))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(self.visual(x), dim=-1) @ self.W.T


def _build(name: str, quick: bool, device: torch.device) -> tuple[nn.Module, Tensor, Tensor, list[str] | None, str]:
    """Model, batch and parameter subset (``None`` = all) for a bench model."""
    torch.manual_seed(0)
    if name == "tiny-vit":
        visual = create_backbone("tiny", seed=0).visual  # 829k parameters, like the zoo's gtsrb θ_ft
        model, B, res, params = _CosineHead(visual, 64, classes=43), (16 if quick else 64), 32, None
        note = "tvdiag 'tiny' backbone, 43 classes (gtsrb-like), all parameters"
    elif name == "vit-b-32":
        import open_clip

        clip = open_clip.create_model("ViT-B-32", pretrained=None)
        model, res = _CosineHead(clip.visual, 512), 224
        B = 2 if (quick and device.type == "cpu") else (4 if quick else 16)
        if device.type == "cpu" and quick:
            params = ["visual.transformer.resblocks.11.*", "visual.ln_post.*", "visual.proj"]
            note = "CPU quick: last block + ln_post + proj only (forward through all 12 blocks)"
        else:
            params, note = None, "all parameters"
    else:
        raise unknown("bench model", name, BENCH_MODELS)
    model = model.to(device)
    x = torch.randn(B, 3, res, res, device=device)
    if name == "tiny-vit":  # the model's own predictions: a loss near a minimum, as at a fine-tuned θ_ft
        with torch.no_grad():
            y = model.eval()(x).argmax(dim=1)
        note += ", labels = the model's predictions"
    else:
        y = torch.randint(0, 10, (B,), device=device)
    return model, x, y, params, note


# ----------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device,
                 mem: dict[str, int | None] | None = None, key: str = "") -> float:
    """Median seconds of ``repeats`` calls after one warm-up call.

    With ``mem`` given, the warm-up call doubles as the memory measurement
    (``mem[key]``), which saves a call per method.
    """
    if mem is not None:
        mem[key] = _peak_extra_bytes(fn, device)
    else:
        fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Extra memory one call of ``fn`` needs at its peak (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if platform.system() != "Linux":
        return None
    _malloc_trim()
    rss0 = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    out = fn()
    hwm = _proc_status_kib("VmHWM")
    del out
    if rss0 is None or hwm is None:
        return None
    return max(0, hwm - rss0) * 1024


# ----------------------------------------------------------------------------- one model


def _bench_products(model: nn.Module, x: Tensor, y: Tensor, params, plist: list[Tensor], v: Tensor, repeats: int,
                    device: torch.device, mem: dict) -> dict[str, Any]:
    """Gradient, HVP from scratch per engine, HVP on a kept graph against the gradient (back to back),
    and the per-probe cost of a block of 8 one by one against one batched second backward (back to back)."""

    def grad():
        return torch.autograd.grad(F.cross_entropy(model(x), y), plist)

    grad()  # first call: lazy initialisation, not measured
    row: dict[str, Any] = {"grad_s": _median_time(grad, repeats, device, mem, "grad")}
    per_engine, errors = {}, {}
    for engine in ENGINES:
        fresh = HessianOperator(model, [(x, y)], params=params, engine=engine, keep_graphs=0)
        try:
            per_engine[engine] = _median_time(lambda op=fresh: op @ v, repeats, device, mem, f"hvp[{engine}]")
        except (RuntimeError, NotImplementedError) as e:
            errors[engine] = f"{type(e).__name__}: {e}"
    best = min(per_engine, key=per_engine.get)
    row.update({"hvp_s": per_engine[best], "hvp_engine": best, "hvp_s_per_engine": per_engine})
    if errors:
        row["engine_errors"] = errors
    kept = HessianOperator(model, [(x, y)], params=params, engine="double-backward")
    kept @ v  # builds the first-order graph it keeps
    t, _ = rounds({"grad": lambda r, o: grad(), "kept": lambda r, o: kept @ v}, max(repeats, 3), device)
    row.update({"hvp_kept_graph_s": statistics.median(t["kept"]), "hvp_kept_over_grad": median_ratio(t["kept"], t["grad"]),
                "hvp_kept_over_grad_rounds": [a / b for a, b in zip(t["kept"], t["grad"])]})
    V = torch.stack([v] * 8, dim=1)
    fresh = HessianOperator(model, [(x, y)], params=params, engine="double-backward", keep_graphs=0)
    batched = HessianOperator(model, [(x, y)], params=params, engine="double-backward", keep_graphs=0,
                              batch_tangents=True)
    fresh @ V, batched @ V  # warm-up
    t, _ = rounds({"loop": lambda r, o: fresh @ V, "batched": lambda r, o: batched @ V}, repeats, device)
    row.update({"block8_per_probe_s": statistics.median(t["loop"]) / 8,
                "block8_batched_per_probe_s": statistics.median(t["batched"]) / 8,
                "block8_batched_over_loop": median_ratio(t["batched"], t["loop"])})
    return row


def _bench_pyhessian(model: nn.Module, x: Tensor, y: Tensor, names: list[str], v: Tensor, repeats: int,
                     device: torch.device, mem: dict) -> dict[str, Any]:
    """PyHessian's full HVP from scratch (data-loader path) and its product on a retained graph."""
    try:
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product
    except ImportError:
        return {"pyhessian_hvp_s": None, "pyhessian_cached_hvp_s": None}

    out: dict[str, Any] = {}
    with _keep_training_flag(model), _only_requires_grad(model, names) as ps, curvature_mode():
        parts = list(torch.split(v, [p.numel() for p in ps]))
        parts = [t.reshape(p.shape) for t, p in zip(parts, ps)]
        comp = hessian(model, nn.CrossEntropyLoss(), dataloader=[(x, y)], cuda=device.type == "cuda")
        out["pyhessian_hvp_s"] = _median_time(lambda: comp.dataloader_hv_product(parts), repeats, device,
                                              mem, "pyhessian")
        cached = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda")
        out["pyhessian_cached_hvp_s"] = _median_time(
            lambda: hessian_vector_product(cached.gradsH, cached.params, parts), repeats, device)
        for p in ps:
            p.grad = None
    return out


def _bench_model(name: str, quick: bool, repeats: int, device: torch.device,
                 probes: int | None = None) -> dict[str, Any]:
    """One row: products (:func:`_bench_products`), PyHessian, curvlinops, estimators, memory, goals."""
    model, x, y, params, note = _build(name, quick, device)
    names = select_params(model, params)
    named = dict(model.named_parameters())
    plist = [named[n] for n in names]
    D = sum(p.numel() for p in plist)
    v = torch.randn(D, generator=torch.Generator().manual_seed(0)).to(device)
    row: dict[str, Any] = {"model": name, "n_params": D, "n_params_model": sum(p.numel() for p in model.parameters()),
                           "params": note, "batch": int(x.shape[0]), "image_size": int(x.shape[-1]),
                           "device": str(device), "repeats": repeats}
    mem: dict[str, int | None] = {}
    row.update(_bench_products(model, x, y, params, plist, v, repeats, device, mem))
    row.update(_bench_pyhessian(model, x, y, names, v, repeats, device, mem))
    try:

        cl = CurvlinopsHessian(model, [(x, y)], params=params)
        row["curvlinops_hvp_s"] = _median_time(lambda: cl @ v, repeats, device, mem, "curvlinops")
    except ImportError:
        row["curvlinops_hvp_s"] = None
    if probes:
        row.update(bench_estimators(model, x, y, params, names, probes, device, repeats))
    row["hvp_over_grad"] = row["hvp_s"] / row["grad_s"]
    row["block8_over_grad"] = min(row["block8_per_probe_s"], row["block8_batched_per_probe_s"]) / row["grad_s"]
    row["pyhessian_over_ours"] = (row["pyhessian_hvp_s"] / row["hvp_s"]) if row.get("pyhessian_hvp_s") else None
    row["curvlinops_over_ours"] = (row["curvlinops_hvp_s"] / row["hvp_s"]) if row.get("curvlinops_hvp_s") else None
    row["peak_mem_bytes"] = mem
    g_mem, h_mem = mem.get("grad"), mem.get(f"hvp[{row['hvp_engine']}]")
    row["peak_mem_over_grad"] = (h_mem / g_mem) if (g_mem and h_mem is not None) else None
    row["peak_mem_method"] = ("cuda.max_memory_allocated" if device.type == "cuda"
                              else "VmHWM growth after clear_refs + malloc_trim")
    row["threads"], row["load_avg_1min"] = torch.get_num_threads(), load_average()
    return _with_goals(row)


def _with_goals(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its ``ratios`` (:data:`RATIOS`) and which :data:`GOALS` it meets (those it has)."""
    row["ratios"] = {k: row.get(k) for k in RATIOS}
    row["goals"] = {k: (row.get(k) is not None and (row[k] <= lim if k.endswith("_over_grad") else row[k] >= lim))
                    for k, lim in GOALS.items() if k in row}
    return row


def run_curvature_bench(quick: bool = True, repeats: int = 3, models: Sequence[str] = BENCH_MODELS,
                        device: str | torch.device | None = None, probes: int | None = None) -> list[dict[str, Any]]:
    """Benchmark gradient vs HVP engines vs PyHessian vs curvlinops, one row per model.

    Args:
        quick: Small batches (and, on CPU, a parameter subset of ViT-B/32) so the
            whole run stays under a minute on 2 CPU cores.
        repeats: Timed calls per method (median reported), after one warm-up.
        models: Names from :data:`BENCH_MODELS`.
        device: Default CUDA if available, else CPU.
        probes: Also time a ``probes``-probe Hutchinson trace and the top eigenvalue
            against PyHessian's (:func:`~diag.bench.estimators.bench_estimators`); None skips them.

    Returns:
        One dict per model with ``model, n_params, batch, grad_s, hvp_s`` (best
        engine), ``hvp_s_per_engine, hvp_over_grad, pyhessian_over_ours,
        curvlinops_over_ours, peak_mem_over_grad`` and the raw numbers behind them.
    """
    for m in models:
        if m not in BENCH_MODELS:
            raise unknown("bench model", m, BENCH_MODELS)
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; must be >= 1")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [_bench_model(m, quick, repeats, dev, probes) for m in models]


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_bench_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the benchmark rows (times in ms, ratios, goal marks)."""
    head = ["model", "D", "batch", "grad ms", "hvp ms (engine)", "other engine ms", "hvp/grad", "kept-graph hvp/grad",
            "block8 ms/probe", "pyhessian ms",
            "pyh/ours", "curvlinops ms", "cl/ours", "mem hvp/grad"]
    lines = []
    for r in rows:
        other = {k: t for k, t in r["hvp_s_per_engine"].items() if k != r["hvp_engine"]}
        goals = r.get("goals", {})

        def mark(k: str, goals: dict = goals) -> str:
            return "" if goals.get(k) is None else (" ok" if goals[k] else " !")

        lines.append([
            r["model"], str(r["n_params"]), str(r["batch"]), _f(r["grad_s"] * 1e3, ".1f"),
            f"{_f(r['hvp_s'] * 1e3, '.1f')} ({r['hvp_engine']})",
            ", ".join(f"{k} {t * 1e3:.1f}" for k, t in other.items()) or "-",
            _f(r["hvp_over_grad"], ".2f") + mark("hvp_over_grad"),
            _f(r["hvp_kept_over_grad"], ".2f") + mark("hvp_kept_over_grad"),
            _f(r["block8_per_probe_s"] * 1e3, ".1f"),
            _f(None if r.get("pyhessian_hvp_s") is None else r["pyhessian_hvp_s"] * 1e3, ".1f"),
            _f(r["pyhessian_over_ours"], ".2f") + mark("pyhessian_over_ours"),
            _f(None if r.get("curvlinops_hvp_s") is None else r["curvlinops_hvp_s"] * 1e3, ".1f"),
            _f(r["curvlinops_over_ours"], ".2f"),
            _f(r["peak_mem_over_grad"], ".2f") + mark("peak_mem_over_grad"),
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    notes = [f"{r['model']}: {r['params']}; device {r['device']}; median of {r['repeats']}; "
             f"pyhessian cached-graph HVP {_f(None if r.get('pyhessian_cached_hvp_s') is None else r['pyhessian_cached_hvp_s'] * 1e3, '.1f')} ms "
             f"(second backward only); memory: {r['peak_mem_method']}" for r in rows]
    goals = ("goals: hvp/grad <= 2.5, pyhessian/ours >= 1.5, peak memory hvp/grad <= 2.5 "
             "(ok = met, ! = missed)")
    return "\n".join(out + [""] + notes + [goals])


def bench_main(quick: bool = False, json_out: bool = False, repeats: int = 3, probes: int | None = None,
               models: Sequence[str] = BENCH_MODELS, store_model: tuple[str, Any] | None = None) -> int:
    """Run the benchmark and print the table (or JSON); returns the exit code 0.

    This is the body of ``diag bench curvature [--quick] [--json] [--probes N] [--domain D]``; it is
    the one place in the curvature package that prints, because printing is its job. ``store_model``:
    ``(domain, workspace)`` adds :func:`store_estimator_row` (its estimator lines; no product table row).
    """
    rows = run_curvature_bench(quick=quick, repeats=repeats, probes=probes, models=models)
    extra = [_with_goals(store_estimator_row(store_model[0], store_model[1], probes, repeats))] \
        if store_model and probes else []
    if json_out:
        print(json.dumps(rows + extra, indent=2, default=str))
    else:
        print("\n".join([format_bench_table(rows), *format_estimator_lines(rows + extra)]))
    return 0
