"""A target's cached curvature Hᵀ at θ_ftᵀ and its diagonal file in the store.

The diagonal file (``curvature/<target>/diag-<key>.safetensors``) holds sufficient
statistics of the Hutchinson diagonal, never one vector per probe unless asked:

* ``diag``, ``stderr``: the mean of the ``n`` per-probe diagonals ``d_k = v_k ⊙ Hᵀv_k``
  and its per-entry standard error ``sqrt(M2_i / (n(n−1)))`` (two ``(D,)`` float64 vectors);
* ``probe_risks``: ``(n, S)`` float64 per-probe scalars ``r_k,s = Σ_i d_k,i τ*ˢ_i²`` of the
  S sources known when the diagonal was built (their names and vector keys in the
  ``risk_sources`` metadata, in column order), from which the standard error of
  ``risk_diag`` = ``Σ_i diag_i τ*ˢ_i²`` is ``sd_k(r_k,s)/√n``
  (:func:`diag.curvature.risk.risk_diagonal_stderr`);
* the probe seed, count and block size (metadata), which replay the probes bit for bit for
  a source that came later (:meth:`diag.features.pair_features.Diagnostics.risks`);
* ``probe_diagonals``: the ``(n, D)`` float32 per-probe diagonals, only with ``--keep-probes``.

A file of the earlier format (``diag``, ``stderr`` and always ``probe_diagonals``, no
``format`` key) still loads: its risks' standard errors come from its per-probe diagonals,
the numbers it gave before. ``--rebuild TARGET`` (or deleting it) rewrites it in this format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diag.curvature.card import HessianCard
from diag.curvature.operators import HessianOperator
from train.tensorio import load_tensors, save_tensors

__all__ = ["DIAG_FORMAT", "TargetCurvature", "load_diagonal", "save_diagonal"]

DIAG_FORMAT = "tvdiag.hutchinson_diag/2"


@dataclass
class TargetCurvature:
    """Hᵀ at θ_ftᵀ: the operator (when target data is at hand), its diagonal and its card.

    Attributes:
        target: The target domain.
        diag, diag_stderr: ``(D,)`` Hutchinson diagonal of Hᵀ and its per-entry standard errors.
        card: The target's :class:`HessianCard`.
        operator: Hᵀ itself, when asked for (target images needed).
        diag_probes: The ``(n, D)`` per-probe diagonals ``v_k ⊙ Hᵀ v_k`` (float32) when kept
            (``--keep-probes``, or a file of the earlier format), else None.
        probe_risks: source-vector key → ``(n,)`` per-probe risks ``r_k = Σ_i d_k,i τ_i²``.
        risk_names: source-vector key → source name (the file's ``risk_sources``).
    """

    target: str
    diag: torch.Tensor
    diag_stderr: torch.Tensor
    card: HessianCard
    operator: HessianOperator | None = None
    diag_probes: torch.Tensor | None = None
    probe_risks: dict[str, torch.Tensor] = field(default_factory=dict)
    risk_names: dict[str, str] = field(default_factory=dict)


def save_diagonal(path: Path, curv: TargetCurvature, meta: dict) -> None:
    """Write ``curv``'s diagonal file (module docstring): columns of ``probe_risks`` sorted by source name.

    Same statistics and metadata, same bytes (the store's fixed-order writer).
    """
    keys = sorted(curv.probe_risks, key=lambda k: (curv.risk_names[k], k))
    tensors = {"diag": curv.diag, "stderr": curv.diag_stderr}
    if keys:
        tensors["probe_risks"] = torch.stack([curv.probe_risks[k].double().cpu() for k in keys], dim=1).contiguous()
    if curv.diag_probes is not None:
        tensors["probe_diagonals"] = curv.diag_probes.float().cpu().contiguous()
    save_tensors(path, tensors, {**meta, "format": DIAG_FORMAT,
                                 "risk_sources": json.dumps([[curv.risk_names[k], k] for k in keys])})


def load_diagonal(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], bool]:
    """Read a diagonal file: ``(tensors, probe_risks by key, names by key, current_format)``.

    ``tensors`` has ``diag``, ``stderr`` and, when stored, ``probe_diagonals``. A file of the
    earlier format has no ``probe_risks`` (``current_format`` False).
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != DIAG_FORMAT:
        return tensors, {}, {}, False
    sources = json.loads(meta.get("risk_sources", "[]"))
    cols = tensors.pop("probe_risks", None)
    risks = {key: cols[:, j].clone() for j, (_, key) in enumerate(sources)} if sources else {}
    return tensors, risks, {key: name for name, key in sources}, True
