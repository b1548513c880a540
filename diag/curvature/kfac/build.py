"""Building a :class:`~diag.curvature.kfac.card.KfacCard` from a model and the target's images."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diag import __version__
from diag.curvature.kfac.card import KfacCard, trace_scales
from diag.curvature.kfac.factors import kfac_factors
from diag.curvature.operators import GGNOperator
from diag.curvature.params import layout_for, select_params
from train.errors import BaseMismatchError, TvdiagError, unknown

__all__ = ["LAYER_SCALES", "build_kfac_card", "build_kfac_cards"]

LAYER_SCALES = ("none", "trace")
#: dtype of the stored factors: bfloat16 halves the card against float32 and moved the card's risk of the
#: suite's 42 pairs by a median 0.007 % (at most 0.05 %) against the same factors in float32.
KFAC_FACTOR_DTYPE = torch.bfloat16


def build_kfac_card(model: nn.Module, data: Iterable, params: str | Sequence[str] | None = None,
                    hessian_diag: Tensor | None = None, gradient: Tensor | bool = True,
                    provenance: Mapping[str, Any] | None = None, factor_dtype: torch.dtype = KFAC_FACTOR_DTYPE,
                    approx: str = "expand", layer_scale: str = "none") -> KfacCard:
    """The K-FAC card of the mean cross-entropy of ``model`` on ``data`` at the model's parameters
    (:func:`build_kfac_cards` with one approximation)."""
    return build_kfac_cards(model, data, params, hessian_diag, gradient, provenance, factor_dtype, (approx,),
                            layer_scale)[approx]


def build_kfac_cards(model: nn.Module, data: Iterable, params: str | Sequence[str] | None = None,
                     hessian_diag: Tensor | None = None, gradient: Tensor | bool = True,
                     provenance: Mapping[str, Any] | None = None, factor_dtype: torch.dtype = KFAC_FACTOR_DTYPE,
                     approxes: Sequence[str] = ("expand",), layer_scale: str = "none") -> dict[str, KfacCard]:
    """K-FAC cards of the mean cross-entropy of ``model`` on ``data`` at the model's parameters, one per
    token approximation (:func:`~diag.curvature.kfac.factors.kfac_factors`; the same passes for all).

    Args:
        model: Maps ``x`` to logits ``(B, C)``.
        data: Re-iterable of ``(x, y)`` batches (the card's images).
        params: Parameter globs (None: every parameter with requires_grad), the card's flat layout.
        hessian_diag: ``(D,)`` diagonal of the Hessian in that layout (e.g. the target's Hutchinson
            diagonal); the card keeps its uncovered entries. None: the uncovered parameters score 0.
        gradient: The ``(D,)`` mean gradient g on the same images, True to compute it (one pass), or
            False for none.
        provenance: Extra facts to record.
        factor_dtype: dtype the factors are kept and stored in (accumulated, and risks computed, in float64).
        approxes: ``expand`` (tokens as rows, the card's form) and/or ``reduce``.
        layer_scale: ``none`` (K-FAC of the GGN as it is) or ``trace`` (each layer's block scaled to the
            trace of ``hessian_diag`` on its entries, :func:`~diag.curvature.kfac.card.trace_scales`).

    Raises:
        BaseMismatchError: ``hessian_diag`` or ``gradient`` of the wrong length.
    """
    if layer_scale not in LAYER_SCALES:
        raise unknown("K-FAC layer scale", layer_scale, LAYER_SCALES)
    if layer_scale == "trace" and hessian_diag is None:
        raise TvdiagError("layer_scale='trace' needs hessian_diag (the Hessian diagonal it matches traces to)")
    names = select_params(model, params)
    layout = layout_for(model, names)
    if iter(data) is data:  # a one-shot iterator: the gradient needs a second pass
        data = list(data)
    layers, factors, n = kfac_factors(model, data, names, dtype=torch.float64, approxes=approxes)
    covered = {p for sp in layers for p in (sp.weight, sp.bias) if p is not None}
    offs = layout.offsets()
    unc = [torch.arange(*offs[nm]) for nm in layout.names if nm not in covered]
    index = torch.cat(unc) if unc else torch.zeros(0, dtype=torch.long)
    if hessian_diag is None:
        fallback = torch.zeros(len(index), dtype=torch.float64)
    else:
        d = hessian_diag.detach().double().cpu().reshape(-1)
        if d.shape[0] != layout.dim:
            raise BaseMismatchError(f"hessian_diag has length {d.shape[0]}, the card has D={layout.dim}.")
        fallback = d[index].clone()
    if isinstance(gradient, bool):
        gradient = GGNOperator(model, data, params=names).gradient().detach().cpu() if gradient else None
    prov = {"form": "kfac", "ggn": "type-2 (exact expectation over the model's labels)", "num_samples": str(n),
            "factor_dtype": str(factor_dtype).replace("torch.", ""), "tvdiag_version": __version__,
            "fallback": "hessian diagonal" if hessian_diag is not None else "none (zeros)"}
    prov.update({str(k): str(v) for k, v in (provenance or {}).items()})
    tokens = {"expand": "expand (tokens as extra batch rows)", "reduce": "reduce (per-image mean input, summed "
              "output gradient)"}
    prov["layer_scale"] = layer_scale
    cards = {ap: KfacCard(layers, [a.to(factor_dtype).cpu() for a in A], [g.to(factor_dtype).cpu() for g in G],
                          fallback, layout.names, layout.shapes, {**prov, "tokens": tokens[ap]}, gradient)
             for ap, (A, G) in factors.items()}
    if layer_scale == "trace":
        for card in cards.values():
            card.layer_scales = trace_scales(card, hessian_diag)
    return cards
