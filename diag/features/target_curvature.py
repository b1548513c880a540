"""A target's cached curvature Hᵀ at θ_ftᵀ and its diagonal file in the store.

The diagonal file (``curvature/<target>/diag-<key>.safetensors``) holds sufficient
statistics of the Hutchinson diagonal, never one vector per probe unless asked:

* ``diag``: the mean of the ``n`` per-probe diagonals ``d_k = v_k ⊙ Hᵀv_k``, one ``(D,)``
  float32 vector (a noisy estimate: float32 loses nothing measurable, and the in-memory
  diagonal of a fresh build is rounded the same way, so a cached and a fresh diagonal give
  the same numbers). Its per-entry standard error ``sqrt(M2_i / (n(n−1)))`` is not stored:
  nothing reads it (the risks' standard errors come from the per-probe risks below);
* ``probe_risks``: ``(n, S)`` float64 per-probe scalars ``r_k,s = Σ_i d_k,i τ*ˢ_i²`` of the
  S sources known when the diagonal was built (their names and vector keys in the
  ``risk_sources`` metadata, in column order), from which the standard error of
  ``risk_diag`` = ``Σ_i diag_i τ*ˢ_i²`` is ``sd_k(r_k,s)/√n``
  (:func:`diag.curvature.risk.risk_diagonal_stderr`);
* the probe seed, count and block size (metadata), which replay the probes bit for bit for
  a source that came later (:meth:`diag.features.pair_features.Diagnostics.risks`);
* ``probe_diagonals``: the ``(n, D)`` float32 per-probe diagonals, only with ``--keep-probes``.

A file of format 2 (float64 ``diag`` and ``stderr``) loads as it is; one of the earlier
format (``diag``, ``stderr`` and always ``probe_diagonals``, no ``format`` key) still loads: its risks' standard errors come from its per-probe diagonals,
the numbers it gave before. ``--rebuild TARGET`` (or deleting it) rewrites it in this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diag.curvature.card import build_card, CardRisk, HessianCard
from diag.curvature.kfac import build_kfac_card, KfacCard
from diag.curvature.operators import HessianOperator
from train.tensorio import load_tensors, save_tensors

__all__ = ["CARD_FILES", "DIAG_FORMAT", "TargetCurvature", "build_eig_card", "build_trace_kfac", "load_diagonal",
           "save_diagonal"]

#: The store's file name of each card form (``curvature/<target>/<name>-<key>.safetensors``).
CARD_FILES = {"eig": "card", "kfac": "card-kfac-trace-bf16"}  # bf16: factors in bfloat16 (float32 before)

DIAG_FORMAT = "tvdiag.hutchinson_diag/3"
#: Earlier formats that load as they are (format 2 kept float64 ``diag`` and ``stderr``).
DIAG_FORMATS_READ = ("tvdiag.hutchinson_diag/2", DIAG_FORMAT)


@dataclass
class TargetCurvature:
    """Hᵀ at θ_ftᵀ: the operator (when target data is at hand), its diagonal and its card.

    Attributes:
        target: The target domain.
        diag, diag_stderr: ``(D,)`` Hutchinson diagonal of Hᵀ and its per-entry standard errors (None when
            read from a file that does not keep them).
        card: The target's card of the scoring form (``risk_card``, ``grad_dot_tau``): a :class:`KfacCard`
            (default) or a :class:`HessianCard`; None while it is being built.
        operator: Hᵀ itself, when asked for (target images needed).
        diag_probes: The ``(n, D)`` per-probe diagonals ``v_k ⊙ Hᵀ v_k`` (float32) when kept
            (``--keep-probes``, or a file of the earlier format), else None.
        probe_risks: source-vector key → ``(n,)`` per-probe risks ``r_k = Σ_i d_k,i τ_i²``.
        risk_names: source-vector key → source name (the file's ``risk_sources``).
        eig: The eigenpair card (:class:`HessianCard`) when it was asked for (the ``eig`` form or a method
            that projects), else None.
        trace, trace_stderr: tr(Hᵀ) from the same probes as the diagonal, and its standard error.
    """

    target: str
    diag: torch.Tensor
    diag_stderr: torch.Tensor | None
    card: CardRisk | None
    operator: HessianOperator | None = None
    diag_probes: torch.Tensor | None = None
    probe_risks: dict[str, torch.Tensor] = field(default_factory=dict)
    risk_names: dict[str, str] = field(default_factory=dict)
    eig: HessianCard | None = None
    trace: float = float("nan")
    trace_stderr: float = float("nan")


def save_diagonal(path: Path, curv: TargetCurvature, meta: dict) -> None:
    """Write ``curv``'s diagonal file (module docstring): columns of ``probe_risks`` sorted by source name.

    Same statistics and metadata, same bytes (the store's fixed-order writer).
    """
    keys = sorted(curv.probe_risks, key=lambda k: (curv.risk_names[k], k))
    tensors = {"diag": curv.diag.float()}
    if keys:
        tensors["probe_risks"] = torch.stack([curv.probe_risks[k].double().cpu() for k in keys], dim=1).contiguous()
    if curv.diag_probes is not None:
        tensors["probe_diagonals"] = curv.diag_probes.float().cpu().contiguous()
    save_tensors(path, tensors, {**meta, "format": DIAG_FORMAT,
                                 "risk_sources": json.dumps([[curv.risk_names[k], k] for k in keys])})


def load_diagonal(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str],
                                       dict[str, str] | None]:
    """Read a diagonal file: ``(tensors, probe_risks by key, names by key, metadata)``.

    ``tensors`` has ``diag`` and, when stored, ``stderr`` and ``probe_diagonals``. A file of the
    earliest format has no ``probe_risks`` (metadata None).
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") not in DIAG_FORMATS_READ:
        return tensors, {}, {}, None
    sources = json.loads(meta.get("risk_sources", "[]"))
    cols = tensors.pop("probe_risks", None)
    risks = {key: cols[:, j].clone() for j, (_, key) in enumerate(sources)} if sources else {}
    return tensors, risks, {key: name for name, key in sources}, meta


def build_eig_card(op: HessianOperator, settings, curv: TargetCurvature, provenance: dict, path: Path) -> HessianCard:
    """The eigenpair card of ``op``: top ``settings.k`` eigenpairs (Lanczos), the residual of ``curv``'s diagonal
    and its trace, g on the same images; saved to ``path`` and returned as the saved file reads."""
    card = build_card(op, min(settings.k, op.shape[0]), hessian_diag=curv.diag, trace=curv.trace,
                      trace_stderr=curv.trace_stderr, provenance=provenance, method="auto", seed=settings.seed)
    card.save(path)
    return HessianCard.load(path) if op.device.type != "cpu" else card  # every cached result lives on the CPU


def build_trace_kfac(op: HessianOperator, curv: TargetCurvature, provenance: dict, path: Path) -> KfacCard:
    """The K-FAC card of ``op``'s model on its images, each layer's block scaled to the trace of ``curv``'s
    Hutchinson diagonal on its entries, that diagonal on the uncovered parameters, g on the same images;
    saved to ``path``."""
    card = build_kfac_card(op.model, op.data, params=list(op.param_names), hessian_diag=curv.diag,
                           gradient=op.gradient().detach().cpu(), layer_scale="trace", provenance=provenance)
    card.save(path)
    return card
