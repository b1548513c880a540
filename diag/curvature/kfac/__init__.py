"""The Kronecker-factored Hessian card: K-FAC factors per linear layer, a diagonal for the rest.

* :mod:`.layers` — which layers are covered and how their inputs and outputs are seen;
* :mod:`.factors` — the factors ``(A, G)`` of the cross-entropy GGN (type-2, tokens expanded);
* :mod:`.card` — :class:`KfacCard` (risk, first order, storage) and :func:`load_any_card`;
* :mod:`.build` — :func:`build_kfac_card` from a model and the target's images.
"""

from diag.curvature.kfac.build import build_kfac_card, build_kfac_cards, KFAC_FACTOR_DTYPE, LAYER_SCALES
from diag.curvature.kfac.card import (CARD_FORMS, card_bytes, card_file_form, KFAC_FORMAT, KfacCard, load_any_card,
                                      trace_scales)
from diag.curvature.kfac.factors import kfac_factors
from diag.curvature.kfac.layers import covered_layers, LayerSpec

__all__ = ["CARD_FORMS", "KFAC_FACTOR_DTYPE", "KFAC_FORMAT", "LAYER_SCALES", "KfacCard", "LayerSpec", "build_kfac_card", "build_kfac_cards", "card_bytes", "card_file_form", "covered_layers",
           "kfac_factors", "load_any_card", "trace_scales"]
