"""Per-pair diagnostics of a candidate transfer: cosines, norms and the risk R(τ*ˢ; Hᵀ).

The risk (paper eq. 12, 16–19) is the curvature of the target's classification loss at
θ_ftᵀ along the explainability vector: R = τ*ˢᵀ Hᵀ τ*ˢ, with the quadratic model
L(θ_ftᵀ + λ τ) − L(θ_ftᵀ) ≈ ½ λ² R. Three estimates by data-access tier:

* ``risk_exact``: one Hessian-vector product on target images (tier 2);
* ``risk_card``: from the target's published :class:`~diag.curvature.card.HessianCard`
  (top-k eigenpairs + residual diagonal), no target data (tier 1);
* ``risk_diag``: Σ diag(Hᵀ)_i τ_i² with a Hutchinson diagonal (tier 1).

The target curvature (operator, diagonal, card) is built once per target and cached in
the store (``curvature/<target>/``), so a study over n domains costs n curvature builds
plus n² cheap evaluations.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from diag.curvature.card import HessianCard, build_card
from diag.curvature.estimators import hutchinson_diagonal
from diag.curvature.operators import HessianOperator
from diag.curvature.risk import risk_diagonal, risk_exact
from diag.similarity import VectorSpec, cosine_streamed
from train.datasets import model_inputs
from train.store import Store, base_state, content_key
from train.tensorio import load_tensors, save_tensors
from train.vectors import TaskVector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurvatureSettings:
    """How a target's curvature is estimated (part of the cache key)."""

    n_images: int = 256
    batch_size: int = 128
    probes: int = 24
    k: int = 8
    seed: int = 0
    engine: str = "auto"
    split: str = "train"
    params: tuple[str, ...] | None = None


@dataclass
class TargetCurvature:
    """Hᵀ at θ_ftᵀ: the operator (when target data is at hand), its diagonal and its card."""

    target: str
    diag: torch.Tensor
    diag_stderr: torch.Tensor
    card: HessianCard
    operator: HessianOperator | None = None


class Diagnostics:
    """Computes and caches curvature per target and diagnostics per pair for one store."""

    def __init__(self, store: Store, alpha: float = 0.8, settings: CurvatureSettings = CurvatureSettings(),
                 data: dict[str, str | Path] | None = None, progress: bool = False):
        self.store = store
        self.alpha = alpha
        self.settings = settings
        self.data = dict(data or {})
        self.progress = progress
        self.backbone, self.base_hash = store.load_base()
        self.base = base_state(self.backbone)
        self._curv: dict[str, TargetCurvature] = {}
        self._vectors: dict[tuple[str, str], TaskVector] = {}

    # ---------------------------------------------------------------- vectors
    def vector(self, domain: str, kind: str) -> TaskVector:
        """τ_ft (``ft``), τ_ft* (``ftx``) or τ* (``star``) of a domain, cached."""
        key = (domain, kind)
        if key not in self._vectors:
            if kind == "star":
                self._vectors[key] = self.vector(domain, "ftx") - self.vector(domain, "ft")
            else:
                self._vectors[key] = self.store.load_vector(domain, kind, self.alpha if kind == "ftx" else None,
                                                            expect_base=self.base_hash)
        return self._vectors[key]

    # -------------------------------------------------------------- curvature
    def operator(self, target: str) -> HessianOperator:
        """Hessian of L_cls at θ_ftᵀ on the first ``n_images`` target images."""
        s = self.settings
        model = self.store.model(target, self.vector(target, "ft").apply_to(self.base, base_hash=self.base_hash),
                                 backbone=self.backbone)
        x, y = model_inputs(self.backbone.config, target, s.split, s.n_images, self.data.get(target))
        n = len(y)
        batches = [(x[i:i + s.batch_size], y[i:i + s.batch_size]) for i in range(0, n, s.batch_size)]
        from diag.curvature.distributed import is_distributed

        # under torchrun each rank takes every world-th batch and products are all-reduced
        return HessianOperator(model, batches, params=list(s.params) if s.params else None, engine=s.engine,
                               shard=is_distributed())

    def _curvature_key(self, target: str) -> str:
        from dataclasses import asdict

        ft_meta = self.vector(target, "ft").provenance
        return content_key({"base": self.base_hash, "ft": ft_meta.get("key", ""), "settings": asdict(self.settings)})

    def card_path(self, target: str) -> Path:
        return self.store.curvature_dir(target) / f"card-k{self.settings.k}.safetensors"

    def diag_path(self, target: str) -> Path:
        return self.store.curvature_dir(target) / "diag.safetensors"

    def curvature(self, target: str, need_operator: bool = False) -> TargetCurvature:
        """Diagonal + card of Hᵀ (cached in the store); the operator too when asked."""
        if target in self._curv and (self._curv[target].operator is not None or not need_operator):
            return self._curv[target]
        key = self._curvature_key(target)
        op = None
        card = None
        if self.store.is_fresh(self.diag_path(target), key) and self.card_path(target).is_file():
            card = HessianCard.load(self.card_path(target))
            if card.provenance.get("key") != key:
                card = None
        if card is not None:
            tensors, _ = load_tensors(self.diag_path(target))
            diag, stderr = tensors["diag"], tensors["stderr"]
        else:
            s = self.settings
            op = self.operator(target)
            est = hutchinson_diagonal(op, num_matvecs=s.probes, seed=s.seed, progress=self.progress)
            diag, stderr = est.mean.double(), est.stderr.double()
            card = build_card(op, s.k, hessian_diag=diag, trace=est.total, trace_stderr=est.total_stderr,
                              provenance={"key": key, "target": target, "base_hash": self.base_hash,
                                          "point": "theta_ft of the target", "n_images": s.n_images,
                                          "probes": s.probes}, method="auto", seed=s.seed)
            save_tensors(self.diag_path(target), {"diag": diag, "stderr": stderr},
                         {"key": key, "target": target, "base_hash": self.base_hash, "trace": est.total,
                          "trace_stderr": est.total_stderr, "probes": s.probes})
            card.save(self.card_path(target))
        if need_operator and op is None:
            op = self.operator(target)
        self._curv[target] = TargetCurvature(target, diag, stderr, card, op)
        return self._curv[target]

    # ------------------------------------------------------------------ pairs
    def cosines(self, source: str, target: str) -> dict[str, float]:
        """cos(τ_ftˢ, τ_ftᵀ) globally and per block, cos(τ*ˢ, τ*ᵀ), and norms (tier 0 + cos_star)."""
        vdir = lambda d: self.store.vector_path(d, "ft").parent  # noqa: E731
        ft = cosine_streamed(self.store.vector_path(source, "ft"), self.store.vector_path(target, "ft"), by="block")
        out = {"cos_ft": ft.cosine}
        out.update({f"cos_ft.{g}": c for g, c in ft.group_cosines().items()})
        try:
            star = cosine_streamed(VectorSpec.explainability(vdir(source), self.alpha),
                                   VectorSpec.explainability(vdir(target), self.alpha))
            out["cos_star"] = star.cosine
        except Exception as err:  # target without θ_ft* (the realistic case): no cos_star
            log.debug("no cos_star for %s→%s: %s", source, target, err)
            out["cos_star"] = math.nan
        out["norm_star_source"] = self.vector(source, "star").norm()
        out["norm_ft_source"] = self.vector(source, "ft").norm()
        out["norm_ft_target"] = self.vector(target, "ft").norm()
        return out

    def risks(self, source: str, target: str, exact: bool = True) -> dict[str, float]:
        """R(τ*ˢ; Hᵀ) exact (one HVP), from the card, and diagonal."""
        curv = self.curvature(target, need_operator=exact)
        tau = curv.card.layout.flatten(self.vector(source, "star").tensors, dtype=torch.float64)
        out = {"risk_card": curv.card.risk(tau), "risk_diag": risk_diagonal(curv.diag, tau), "risk_exact": math.nan}
        if exact and curv.operator is not None:
            out["risk_exact"] = risk_exact(curv.operator, tau.to(curv.operator.dtype))
        return out

    def pair(self, source: str, target: str, curvature: bool = True, exact: bool = True) -> dict[str, float]:
        out = self.cosines(source, target)
        if curvature:
            out.update(self.risks(source, target, exact=exact))
        else:
            out.update(risk_card=math.nan, risk_diag=math.nan, risk_exact=math.nan)
        return out


def pair_diagnostics(store: Store, source: str, target: str, alpha: float = 0.8, curvature: bool = True,
                     data: dict[str, str | Path] | None = None) -> dict[str, float]:
    """Diagnostics of one (source, target) pair; see :class:`Diagnostics` to reuse caches across pairs."""
    return Diagnostics(store, alpha, data=data).pair(source, target, curvature=curvature)
