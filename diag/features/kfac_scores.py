"""Tier-1 risks of a folder of sources against a K-FAC Hessian card (open-world ranking).

The eig card is streamed parameter by parameter (:mod:`diag.features.streamed`); a
:class:`~diag.curvature.kfac.KfacCard` scores a layer's weight and bias together
(``tr(Tᵀ G T A)``), so each source's τ* is read whole, one source at a time, over the card's
parameters: ``risk_card`` = R_kfac(τ*), ``risk_diag`` = Σ diag(H)_j τ*_j² with the Hutchinson
diagonal the card file stores beside its factors (``hessian_diag``; absent: None) and
``grad_dot_tau`` = gᵀτ* (None when the card stores no g).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diag.curvature.kfac import KfacCard
from diag.features.mapped import TensorFile
from diag.curvature.card import check_card_provenance

__all__ = ["kfac_risks"]


def _star(src, name: str) -> torch.Tensor:
    """τ*ˢ of one parameter: the ``star`` file's, else ``ftx − ft``."""
    if src.star is not None:
        return src.star.read(name).double()
    return src.ftx.read(name).double() - src.ft.read(name).double()


def kfac_risks(card_path: str | Path, sources: list, base_hash: str, model_sha: str) -> dict[str, dict]:
    """source name → ``{risk_card, risk_diag, grad_dot_tau}`` against the K-FAC card at ``card_path``.

    Raises:
        BaseMismatchError: the card was built on another base or for another target model.
        ArtifactError: a damaged card.
    """
    card = KfacCard.load(card_path)
    check_card_provenance(card.provenance, card_path, base_hash, model_sha)
    f = TensorFile(card_path)
    try:
        diag = f.read("hessian_diag").double() if "hessian_diag" in f.entries else None
    finally:
        f.close()
    out = {}
    for src in sources:
        tau = card.layout.flatten({n: _star(src, n) for n in card.param_names}, dtype=torch.float64)
        out[src.name] = {"risk_card": card.risk(tau),
                         "risk_diag": None if diag is None else float((diag * tau.pow(2)).sum()),
                         "grad_dot_tau": card.first_order(tau)}
    return out
