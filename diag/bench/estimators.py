"""Curvature bench, estimator part: trace and top eigenvalue, ours against PyHessian's.

Every method runs once per round, in turn, ``repeats`` rounds (round ``r`` uses seed
``r`` everywhere), so a busy machine slows all of them alike; a ratio is the median of
the per-round ratios of times measured back to back. Every timing includes building
the first-order graph (a fresh operator per call; PyHessian's ``hessian(...)``).
On a CPU device the times are the process's CPU seconds (:func:`clock`).

* Trace, same probes: :func:`hutchinson_trace` (blocks of 8) against PyHessian's
  ``trace(maxIter=probes, tol=-inf)`` (exactly ``probes`` probes: its own stop rule
  divides by the signed trace). Same estimator, same accuracy by construction.
* Trace, equal accuracy: :func:`hutchpp_trace` with ``probes`` products; its variance
  falls as ``1/products``, so it reaches PyHessian's standard error with
  ``(se_hpp / se_pyh)²`` of its products: ratio ``(t_pyh / t_hpp) · (se_pyh / se_hpp)²``. The same
  extrapolation gives each estimator's time to a relative standard error of :data:`TRACE_REL_SE`
  (1 %): ``*_time_to_rel_se_s``.
* Top eigenvalue, time to accuracy: a reference ``λ*`` (Lanczos to ``r²/gap <= 1e-10 · λ`` or 60
  steps, untimed) and a target relative error ``eig_accuracy`` (default :data:`EIG_ACCURACY`, 1e-3).
  PyHessian's ``eigenvalues(top_n=1)`` (power iteration from a random vector) runs its full
  ``maxIter`` (:data:`PYHESSIAN_MAX_ITER`) with every product's Rayleigh quotient and clock time
  recorded: its time to accuracy is the time (graph built included) of the first product from which on
  every estimate is within ``eig_accuracy`` of ``λ*`` — an oracle stop no run of its own can
  know, the most favourable reading of it. Its own rule (relative change ``< 1e-3``) is read off the same
  record (``pyhessian_eig_own_rule_*``: where it would have stopped, with what error). Ours,
  :func:`lanczos_topk` (k = 1), stops by its own rule (eigenvalue error estimate ``r²/gap``) at
  ``value_tol = eig_accuracy`` — from a random start (``eig``) and from :func:`gradient_start`
  (``eig_gradient_start``); ``*_reached_rounds`` counts the rounds in which it really is within
  ``eig_accuracy``. ``pyhessian_over_ours_eig`` is the median over rounds of PyHessian's time to
  accuracy over ours; None when PyHessian never got there in ``maxIter`` products. Without PyHessian
  installed, ours runs alone and no ratio is reported.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diag.curvature.backends import _count_pyhessian_hvps, _keep_training_flag, _only_requires_grad
from diag.curvature.hutchinson import hutchinson_trace
from diag.curvature.hutchpp import hutchpp_trace
from diag.curvature.lanczos import gradient_start, lanczos_topk
from diag.curvature.operators import HessianOperator
from diag.curvature.operators.attention import curvature_mode
from diag.curvature.params import select_params
from diag.features.pair_features import CurvatureSettings, Diagnostics
from train.datasets import model_inputs
from train.errors import TvdiagError

__all__ = ["bench_estimators", "format_estimator_lines", "load_average", "median_ratio", "own_rule_stop", "rounds",
           "store_estimator_row", "time_to_accuracy"]

STORE_BENCH_IMAGES = 64
"""Val images of ``diag bench curvature --domain D`` (the batch the estimators are timed on)."""

TRACE_REL_SE = 0.01
"""Relative standard error of the trace the estimators' times are extrapolated to (``*_time_to_rel_se_s``)."""

EIG_ACCURACY = 1e-3
"""Relative error of the top eigenvalue both estimators are timed to (against a converged reference)."""

PYHESSIAN_MAX_ITER = 100
"""PyHessian's ``maxIter`` (its default): the products its recorded power iteration runs."""


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the machine was while timing."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """The clock of :func:`rounds`: the process's CPU time on a CPU device, else wall time.

    With one thread CPU time equals wall time on an idle machine, and on a busy one it
    leaves out the time spent waiting for a core, which wall time charges at random to
    whichever method was running. On a GPU the host waits in ``synchronize``: wall time.
    """
    return time.process_time if device.type == "cpu" else time.perf_counter


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` by :func:`clock`, and its output."""
    now = clock(device)
    _sync(device)
    t0 = now()
    out = fn()
    _sync(device)
    return now() - t0, out


def rounds(fns: dict[str, Callable[[int, dict[str, list]], Any]], repeats: int,
           device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Seconds (:func:`clock`) and outputs of ``fns[name](r, outs)`` for rounds ``r = 0..repeats-1``.

    Each round calls every method once, in the order of ``fns``; ``outs`` holds the
    outputs so far, so a method may read an earlier method's output of the same round.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, list[Any]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            t, out = time_once(lambda fn=fn: fn(r, outs), device)
            times[k].append(t)
            outs[k].append(out)
    return times, outs


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return statistics.median(a / b for a, b in zip(num, den))


def _pyhessian_runner(model: nn.Module, x: Tensor, y: Tensor, names: list[str], device: torch.device):
    """``run(fn, seed, on_product=None)``: ``fn(hessian(...))`` with PyHessian's products counted (each
    ``(v, Hv)`` also passed to ``on_product``); ``None`` without PyHessian."""
    try:
        from pyhessian import hessian
    except ImportError:
        return None

    def run(fn, seed: int, on_product=None):
        with _keep_training_flag(model), _only_requires_grad(model, names), curvature_mode(), \
                torch.random.fork_rng(), _count_pyhessian_hvps(on_product) as count:
            torch.manual_seed(seed)
            out = fn(hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=device.type == "cuda"))
        return out, count[0]

    return run


def _pyhessian_eig_run(ph, device: torch.device):
    """``run(r)``: PyHessian's power iteration for ``PYHESSIAN_MAX_ITER`` products from seed ``r``, with
    ``(clock time, vᵀHv)`` recorded after each product (its estimates: ``v`` is the unit iterate; the quotient
    is what PyHessian computes next anyway, one dot product per step):
    ``{"start": clock time before its graph, "steps": [(clock time, estimate)], "products": n}``."""
    def run(r: int, o: dict) -> dict:
        now, steps = clock(device), []

        def record(v, Hv) -> None:
            quotient = float(sum((h * u).sum() for h, u in zip(Hv, v)))
            _sync(device)
            steps.append((now(), quotient))

        _sync(device)
        start = now()
        _, n = ph(lambda c: c.eigenvalues(maxIter=PYHESSIAN_MAX_ITER, tol=-math.inf, top_n=1), r, record)
        return {"start": start, "steps": steps, "products": n}

    return run


def time_to_accuracy(run: dict, lam_ref: float, accuracy: float) -> tuple[float | None, int | None]:
    """(seconds, products) of a recorded power iteration until every later estimate is within ``accuracy``
    of ``lam_ref`` (relative); ``(None, None)`` when its last estimate is not."""
    errs = [_rel_err(lam, lam_ref) for _, lam in run["steps"]]
    if not errs or errs[-1] > accuracy:
        return None, None
    k = len(errs) - 1
    while k > 0 and errs[k - 1] <= accuracy:
        k -= 1
    return run["steps"][k][0] - run["start"], k + 1


def own_rule_stop(run: dict, tol: float = 1e-3) -> tuple[float, int, float]:
    """(seconds, products, estimate) where PyHessian's own rule would stop: the first step whose estimate
    changed by less than ``tol`` relative to the previous one (PyHessian then returns the previous one)."""
    steps = run["steps"]
    for i in range(1, len(steps)):
        prev, cur = steps[i - 1][1], steps[i][1]
        if abs(prev - cur) / (abs(prev) + 1e-6) < tol:
            return steps[i][0] - run["start"], i + 1, prev
    return steps[-1][0] - run["start"], len(steps), steps[-1][1]


def _trace_part(op, probes: int, ph) -> dict[str, Callable]:
    fns: dict[str, Callable] = {"trace": lambda r, o: hutchinson_trace(op(), num_matvecs=probes, seed=r),
                                "hutchpp": lambda r, o: hutchpp_trace(op(), num_matvecs=probes, seed=r)}
    if ph is not None:
        fns["pyhessian_trace"] = lambda r, o: ph(lambda c: c.trace(maxIter=probes, tol=-math.inf), r)
    return fns


def _rel_err(lam: float, lam_ref: float) -> float:
    """|λ − λ*| / |λ*|."""
    return abs(lam - lam_ref) / abs(lam_ref)


def _eig_part(op, accuracy: float, ph, device: torch.device) -> dict[str, Callable]:
    def grad_start(r: int, o: dict[str, list]):
        A = op()
        return lanczos_topk(A, 1, seed=r, value_tol=accuracy, v0=gradient_start(A, r))

    fns: dict[str, Callable] = {}
    if ph is not None:
        fns["pyhessian_eig"] = _pyhessian_eig_run(ph, device)
    fns["eig"] = lambda r, o: lanczos_topk(op(), 1, seed=r, value_tol=accuracy)
    fns["eig_gradient_start"] = grad_start
    return fns


def _time_to_rel_se(seconds: float, stderr: float, value: float, target: float = TRACE_REL_SE) -> float | None:
    """Seconds a trace estimator needs for a relative standard error of ``target``, extrapolated from one
    measured run (its variance falls as 1 / products, so its time grows as (se / (target · |value|))²);
    None without a positive standard error or with a zero estimate."""
    if not (stderr > 0 and value != 0 and math.isfinite(stderr)):
        return None
    return seconds * (stderr / (target * abs(value))) ** 2


def _trace_numbers(t: dict[str, list[float]], outs: dict[str, list], probes: int) -> dict[str, Any]:
    tr, hpp = outs["trace"][-1], outs["hutchpp"][-1]
    out: dict[str, Any] = {"est_probes": probes, "trace_s": statistics.median(t["trace"]), "trace": tr.value,
                           "trace_stderr": tr.stderr, "hutchpp_s": statistics.median(t["hutchpp"]),
                           "hutchpp": hpp.value, "hutchpp_stderr": hpp.stderr, "trace_rel_se_target": TRACE_REL_SE}
    out["trace_time_to_rel_se_s"] = _time_to_rel_se(out["trace_s"], tr.stderr, tr.value)
    out["hutchpp_time_to_rel_se_s"] = _time_to_rel_se(out["hutchpp_s"], hpp.stderr, hpp.value)
    if "pyhessian_trace" not in outs:
        return out
    ses = [statistics.stdev(v) / math.sqrt(len(v)) for v, _ in outs["pyhessian_trace"]]
    vals, n = outs["pyhessian_trace"][-1]
    out.update({"pyhessian_trace_s": statistics.median(t["pyhessian_trace"]),
                "pyhessian_trace": float(statistics.mean(vals)), "pyhessian_trace_stderr": ses[-1],
                "pyhessian_trace_matvecs": n,
                "pyhessian_over_ours_trace": median_ratio(t["pyhessian_trace"], t["trace"])})
    out["pyhessian_trace_time_to_rel_se_s"] = _time_to_rel_se(out["pyhessian_trace_s"], ses[-1],
                                                              out["pyhessian_trace"])
    hpp_se = [h.stderr for h in outs["hutchpp"]]
    out["pyhessian_over_ours_trace_equal_accuracy"] = (  # None: Hutch++ with one probe has no stderr
        statistics.median((tp / th) * (sp / sh) ** 2 for tp, th, sp, sh in zip(
            t["pyhessian_trace"], t["hutchpp"], ses, hpp_se)) if all(s > 0 for s in hpp_se) else None)
    return out


def _eig_numbers(t: dict[str, list[float]], outs: dict[str, list], lam_ref: float, accuracy: float) -> dict[str, Any]:
    out: dict[str, Any] = {"eig_accuracy": accuracy}
    for key in ("eig", "eig_gradient_start"):
        res = outs[key]
        errs = [_rel_err(float(r.eigvals[0]), lam_ref) for r in res]
        out.update({f"{key}_s": statistics.median(t[key]), f"{key}_matvecs": [r.n_matvecs for r in res],
                    f"{key}_rel_err": errs, f"{key}_reached_rounds": sum(e <= accuracy for e in errs)})
    eig = outs["eig"][-1]
    out.update({"top_eig": float(eig.eigvals[0]), "top_eig_residual": float(eig.residuals[0])})
    if "pyhessian_eig" not in outs:
        return out
    runs = outs["pyhessian_eig"]
    tta = [time_to_accuracy(run, lam_ref, accuracy) for run in runs]
    own = [own_rule_stop(run) for run in runs]
    out.update({"pyhessian_eig_time_to_accuracy_s": [s for s, _ in tta], "pyhessian_eig_matvecs": [n for _, n in tta],
                "pyhessian_top_eig": float(runs[-1]["steps"][-1][1]),
                "pyhessian_eig_own_rule_s": [s for s, _, _ in own], "pyhessian_eig_own_rule_matvecs": [n for _, n, _ in own],
                "pyhessian_eig_own_rule_rel_err": [_rel_err(lam, lam_ref) for _, _, lam in own]})
    out["top_eig_rel_diff"] = abs(out["top_eig"] - out["pyhessian_top_eig"]) / abs(out["pyhessian_top_eig"])
    for key, suffix in (("eig", ""), ("eig_gradient_start", "_gradient_start")):
        ratios = [p / o for (p, _), o in zip(tta, t[key]) if p is not None]
        out[f"pyhessian_over_ours_eig{suffix}"] = statistics.median(ratios) if ratios else None
    return out


def bench_estimators(model: nn.Module, x: Tensor, y: Tensor, params, names: list[str], probes: int,
                     device: torch.device, repeats: int = 3, eig_accuracy: float = EIG_ACCURACY) -> dict[str, Any]:
    """Trace and top eigenvalue, ours against PyHessian's (see the module docstring).

    Args:
        model: the classifier (cross-entropy loss on ``(x, y)``).
        x, y: one batch of inputs and labels.
        params: the parameters of our Hessian operator (:class:`diag.curvature.operators.HessianOperator`'s ``params``).
        names: the names of the same parameters (the only ones PyHessian differentiates).
        probes: Hutchinson probes of each trace estimate (and Hutch++'s products); at least 2.
        device: where ``model`` and the batch are (sets the clock, :func:`clock`).
        repeats: rounds.
        eig_accuracy: the top eigenvalue's target relative error (time to accuracy).

    Returns:
        Seconds (medians over rounds), estimates, per-round products and reached
        eigenvalue errors, and the ratios ``pyhessian_over_ours_trace``,
        ``pyhessian_over_ours_trace_equal_accuracy``, ``pyhessian_over_ours_eig`` and
        ``pyhessian_over_ours_eig_gradient_start`` (medians of per-round ratios).

    Raises:
        TvdiagError: ``probes`` below 2 (PyHessian's trace has no standard error from one probe).
    """
    if probes < 2:
        raise TvdiagError(f"--probes {probes}: the estimator bench needs at least 2 probes (a standard error)")

    def op() -> HessianOperator:
        return HessianOperator(model, [(x, y)], params=params, engine="double-backward")

    ref = lanczos_topk(op(), 1, num_iters=60, value_tol=1e-10)
    lam_ref = float(ref.eigvals[0])
    ph = _pyhessian_runner(model, x, y, names, device)
    t, outs = rounds({**_trace_part(op, probes, ph), **_eig_part(op, eig_accuracy, ph, device)}, repeats, device)
    return {"est_repeats": repeats, "top_eig_reference": lam_ref, "top_eig_reference_matvecs": ref.n_matvecs,
            "top_eig_reference_residual": float(ref.residuals[0]),
            **_trace_numbers(t, outs, probes), **_eig_numbers(t, outs, lam_ref, eig_accuracy)}


def store_estimator_row(domain: str, workspace, probes: int, repeats: int = 3,
                        n_images: int = STORE_BENCH_IMAGES) -> dict[str, Any]:
    """The estimators (:func:`~diag.bench.estimators.bench_estimators`) on a trained model: the store's θ_ft
    of ``domain`` (from ``workspace``, a :class:`diag.runtime.context.Workspace`) and its first ``n_images``
    val images, every parameter of the vision tower — where the top eigenvalue is not as isolated as at a
    random initialisation, so the estimators' stopping rules are put to the test."""
    diag = Diagnostics(workspace)
    model = diag.model(domain)
    x, y = model_inputs(diag.backbone.config, domain, "val", n_images, workspace.data.get(domain))
    x, y = x.to(workspace.device), y.to(workspace.device)
    names = select_params(model, CurvatureSettings().params or None)
    row: dict[str, Any] = {"model": f"θ_ft {domain}", "n_params": sum(dict(model.named_parameters())[n].numel()
                                                                       for n in names),
                           "batch": int(len(y)), "device": str(workspace.device), "repeats": repeats,
                           "threads": torch.get_num_threads(), "load_avg_1min": load_average()}
    row.update(bench_estimators(model, x, y, names, names, probes, torch.device(workspace.device), repeats))
    return row


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _errs(xs: list[float] | None) -> str:
    return "-" if xs is None else "/".join(f"{e:.1g}" for e in xs)


def _secs(xs: list[float | None] | None) -> str:
    return "-" if xs is None else "/".join("never" if x is None else f"{x:.2f}" for x in xs)


def format_estimator_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Two lines per model with the estimator timings of :func:`bench_estimators`."""
    lines = []
    for r in rows:
        if "trace_s" not in r:
            continue
        lines.append(
            f"{r['model']}: {r['est_probes']}-probe trace ours {r['trace_s']:.2f} s ({r['trace']:.6g} ± "
            f"{r['trace_stderr']:.2g}) vs PyHessian {_f(r.get('pyhessian_trace_s'), '.2f')} s "
            f"({_f(r.get('pyhessian_trace'), '.6g')} ± {_f(r.get('pyhessian_trace_stderr'), '.2g')}): "
            f"x{_f(r.get('pyhessian_over_ours_trace'), '.2f')}; Hutch++ {r['hutchpp_s']:.2f} s "
            f"({r['hutchpp']:.6g} ± {r['hutchpp_stderr']:.2g}; at PyHessian's accuracy "
            f"x{_f(r.get('pyhessian_over_ours_trace_equal_accuracy'), '.2f')})")
        tta = r.get("pyhessian_eig_time_to_accuracy_s")
        lines.append(
            f"{r['model']}: top eigenvalue to a relative error of {r['eig_accuracy']:g} (reference "
            f"{r['top_eig_reference']:.6g}): PyHessian's power iteration {_secs(tta)} s, products "
            f"{r.get('pyhessian_eig_matvecs', '-')} (oracle stop; its own rule: {_secs(r.get('pyhessian_eig_own_rule_s'))} s, "
            f"errors {_errs(r.get('pyhessian_eig_own_rule_rel_err'))}); ours random start {r['eig_s']:.2f} s, products "
            f"{r['eig_matvecs']}, errors {_errs(r['eig_rel_err'])}: x{_f(r.get('pyhessian_over_ours_eig'), '.2f')}; "
            f"gradient start {r['eig_gradient_start_s']:.2f} s, products {r['eig_gradient_start_matvecs']}, errors "
            f"{_errs(r['eig_gradient_start_rel_err'])}: x{_f(r.get('pyhessian_over_ours_eig_gradient_start'), '.2f')}")
    return lines
