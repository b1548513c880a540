"""Per-pair diagnostics of a candidate transfer: cosines, norms and the risk R(τ*ˢ; Hᵀ).

The risk (paper eq. 12, 16–19) is the curvature of the target's classification loss at
θ_ftᵀ along the explainability vector: R = τ*ˢᵀ Hᵀ τ*ˢ, with the quadratic model
L(θ_ftᵀ + λ τ) − L(θ_ftᵀ) ≈ ½ λ² R. Three estimates by data-access tier:

* ``risk_exact``: one Hessian-vector product on target images (tier 2);
* ``risk_card``: from the target's published card, no target data (tier 1): by default
  (``card_form="kfac"``) its :class:`~diag.curvature.kfac.KfacCard` (K-FAC of the GGN per linear
  layer, each block scaled to the trace of the Hutchinson diagonal on its entries, the diagonal
  elsewhere; cached as ``card-kfac-trace``), with ``card_form="eig"`` its
  :class:`~diag.curvature.card.HessianCard` (top-k eigenpairs + residual diagonal, cached as
  ``card``). Measured on the mini-suite (``scripts/card_fidelity.py``) the K-FAC card ranks a
  target's sources as well as the eig card at a sixth of its size and needs no Lanczos run;
* ``risk_diag``: Σ diag(Hᵀ)_i τ_i² with a Hutchinson diagonal (tier 1), and ``risk_diag_se``,
  its standard error from the probes: probe k's diagonal d_k = v_k ⊙ Hᵀv_k gives
  r_k = Σ_i d_k,i τ_i², and se = sd(r_k)/√n. The n scalars r_k of every source the store
  holds are accumulated while the diagonal is built and kept with it
  (:mod:`diag.features.target_curvature`); a later source replays the probes from their seeds.
* ``grad_dot_tau``: gᵀτ*ˢ, the first-order term of the loss model λ·gᵀτ + ½λ²R
  (:func:`diag.curvature.risk.loss_model`), g the mean gradient at θ_ftᵀ stored in the card —
  on the curvature's images (``split``, the target's train images), never the ``val`` images the
  measured loss change is scored on.

The target curvature (operator, diagonal, card) is built once per target and cached in
the store (``curvature/<target>/``), so a study over n domains costs n curvature builds
plus n² cheap evaluations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diag.constants import PAPER_ALPHA
from diag.curvature.card import HessianCard
from diag.curvature.hutchinson import DEFAULT_BLOCK_SIZE, hutchinson_diagonal
from diag.curvature.kfac import KfacCard
from diag.curvature.operators import HessianOperator
from diag.curvature.risk import probe_risks, risk_diagonal, risk_diagonal_stderr, risk_exact
from diag.features.settings import CurvatureSettings, PRESET_CURVATURE  # noqa: F401  (re-exported: the settings' home)
from diag.features.similarity import vector_similarity
from diag.features.target_curvature import (build_eig_card, build_trace_kfac, CARD_FILES, load_diagonal,
                                             save_diagonal, TargetCurvature)
from diag.runtime.context import Workspace
from diag.runtime.distributed import is_distributed
from train.datasets import model_inputs
from train.store import content_key, has_twin, Store
from train.vectors import TaskVector

log = logging.getLogger(__name__)

RISK_COLUMNS = ("risk_exact", "risk_diag", "risk_diag_se", "risk_card", "grad_dot_tau")


#: Targets whose Hessian operator (model, images, kept graph; ~0.2-0.3 GB at tiny) stays in memory; older ones rebuild it.
MAX_OPERATORS = 1


class Diagnostics:
    """Computes and caches curvature per target and diagnostics per pair, on a shared :class:`Workspace`.

    Args:
        store: a :class:`~train.store.Store` or a :class:`~diag.runtime.context.Workspace` (shared θ_base and vectors).
        alpha: α of τ* (taken from the workspace when one is given).
        settings: how each target's Hᵀ is estimated (part of the curvature cache key).
        data: domain → local dataset path.
        progress: progress bars for curvature builds.
        data_parallel: under torch.distributed, split each target's batches over the ranks and all-reduce
            the products (default: whenever a group is up); False when ranks work on different targets.
        keep_probes: also keep the ``(n, D)`` per-probe diagonals in the diagonal file (``--keep-probes``;
            ``n · D · 4`` bytes per target); a cached diagonal without them is rebuilt (same probes, same numbers).
        sources: the sources whose per-probe risks a target's diagonal build accumulates (default: every
            domain with θ_ft and θ_ft* of this run).
        card_form: overrides ``settings.card_form`` (the card ``risk_card`` and ``grad_dot_tau`` come from).
    """

    def __init__(self, store: Store | Workspace, alpha: float = PAPER_ALPHA,
                 settings: CurvatureSettings = CurvatureSettings(), data: dict[str, str | Path] | None = None,
                 progress: bool = False, data_parallel: bool | None = None, keep_probes: bool = False,
                 sources: Sequence[str] | None = None, card_form: str | None = None):
        if card_form is not None:
            settings = replace(settings, card_form=card_form)
        self.ws = store if isinstance(store, Workspace) else Workspace(store, alpha, data)
        self.store = self.ws.store
        self.alpha = self.ws.alpha
        self.settings = settings
        self.data = self.ws.data
        self.progress = progress
        self.data_parallel = data_parallel
        self.keep_probes = keep_probes
        self.sources = None if sources is None else list(sources)
        self._curv: dict[str, TargetCurvature] = {}

    @property
    def card_form(self) -> str:
        """The card ``risk_card`` and ``grad_dot_tau`` come from (``settings.card_form``)."""
        return self.settings.card_form

    @property
    def backbone(self):
        """θ_base's CLIP backbone (the workspace's, loaded on first use)."""
        return self.ws.backbone

    @property
    def base_hash(self) -> str:
        """θ_base's hash (read from the base file's header)."""
        return self.ws.base_hash

    @property
    def base(self) -> dict:
        return self.ws.base

    # ---------------------------------------------------------------- vectors
    def vector(self, domain: str, kind: str) -> TaskVector:
        """τ_ft (``ft``), τ_ft* (``ftx``) or τ* (``star``) of a domain, from the workspace."""
        return self.ws.vector(domain, kind)

    def model(self, target: str):
        """The target's prediction-only model at θ_ftᵀ (its head, θ_base + τ_ftᵀ), on the workspace's device."""
        return self.store.model(target, self.vector(target, "ft").apply_to(self.base, base_hash=self.base_hash),
                                backbone=self.backbone).to(self.ws.device)

    def operator(self, target: str) -> HessianOperator:
        """Hessian of L_cls at θ_ftᵀ on the first ``n_images`` target images."""
        s = self.settings
        model = self.model(target)
        x, y = model_inputs(self.backbone.config, target, s.split, s.n_images, self.data.get(target))
        n = len(y)
        batches = [(x[i:i + s.batch_size], y[i:i + s.batch_size]) for i in range(0, n, s.batch_size)]

        # data-parallel under torchrun: each rank takes every world-th batch and products are all-reduced
        dp = is_distributed() if self.data_parallel is None else self.data_parallel and is_distributed()
        return HessianOperator(model, batches, params=list(s.params) if s.params else None, engine=s.engine,
                               shard=dp, data_parallel=dp)

    def _curvature_key(self, target: str) -> str:
        """The cache key of the target's curvature files: θ_base, θ_ftᵀ and the settings, not the card form
        (each form has its own file name, :meth:`card_path`)."""
        ft_meta = self.vector(target, "ft").provenance
        settings = {k: v for k, v in asdict(self.settings).items() if k != "card_form"}
        return content_key({"base": self.base_hash, "ft": ft_meta.get("key", ""), "settings": settings})

    def card_path(self, target: str, form: str | None = None) -> Path:
        """The target's Hessian card of ``form`` (default :attr:`card_form`), keyed by θ_ftᵀ and the curvature
        settings (:meth:`Store.curvature_path`): ``card-…`` (eig) or ``card-kfac-trace-…`` (kfac)."""
        form = self.card_form if form is None else form
        return self.store.curvature_path(target, CARD_FILES[form], {"key": self._curvature_key(target)})

    def diag_path(self, target: str) -> Path:
        """The target's Hutchinson diagonal with standard errors, keyed like :meth:`card_path`."""
        return self.store.curvature_path(target, "diag", {"key": self._curvature_key(target)})

    def curvature(self, target: str, need_operator: bool = False, need_eig: bool = False) -> TargetCurvature:
        """Diagonal (with the known sources' per-probe risks) + the card of :attr:`card_form` of Hᵀ (cached in
        the store); the operator too when asked, the eigenpair card with ``need_eig`` (``project``).

        Nothing is computed that the cache holds: a cached diagonal of the earlier format (with per-probe
        diagonals) is read as it is; one without per-probe diagonals or risks, or without the probes
        ``keep_probes`` asks for, is recomputed with the same probes; a fresh card is reused; an eig card
        cached before g was stored gets g (same images).
        """
        have = self._curv.get(target)
        need_eig = need_eig or self.card_form == "eig"
        if have is not None and (have.operator is not None or not need_operator) and (have.eig is not None or not need_eig):
            return have
        key = self._curvature_key(target)
        # every verdict before anything is computed: a file tvdiag did not write is refused, never replaced
        diag_verdict = self.store.decide(self.diag_path(target), key, what=f"{target} Hessian diagonal")
        eig_verdict = self.store.decide(self.card_path(target, "eig"), key, what=f"{target} Hessian card") \
            if need_eig else None
        kfac_verdict = self.store.decide(self.card_path(target, "kfac"), key, what=f"{target} K-FAC card") \
            if self.card_form == "kfac" else None
        curv = have if have is not None else self._cached_diagonal(target, diag_verdict)
        eig = curv.eig if curv is not None and curv.eig is not None else (
            HessianCard.load(eig_verdict.path) if eig_verdict is not None and eig_verdict.usable else None)
        card = curv.card if curv is not None and curv.card is not None else (
            KfacCard.load(kfac_verdict.path) if kfac_verdict is not None and kfac_verdict.usable else None)
        stale = eig is not None and eig.gradient is None  # an eig card cached before g was stored
        op = have.operator if have is not None else None
        if op is None and (curv is None or need_operator or stale or (need_eig and eig is None)
                           or (self.card_form == "kfac" and card is None)):
            op = self.operator(target)
        if stale:
            eig.gradient = op.gradient().detach().cpu()
            eig.save(self.card_path(target, "eig"))
        if curv is None:
            curv = self._build_diagonal(op, target, key)
        if need_eig and eig is None:
            eig = build_eig_card(op, self.settings, curv, self._card_provenance(target, key),
                                 self.card_path(target, "eig"))
        if self.card_form == "kfac" and card is None:
            card = build_trace_kfac(op, curv, self._card_provenance(target, key), self.card_path(target, "kfac"))
        curv.card, curv.eig, curv.operator = eig if self.card_form == "eig" else card, eig, op
        self._curv.pop(target, None)
        self._curv[target] = curv  # the most recently used last
        held = [t for t, c in self._curv.items() if c.operator is not None and t != target]
        for t in held[:max(0, len(held) - MAX_OPERATORS + 1)]:  # operators rebuild on demand; the study is target-major
            self._curv[t].operator = None
        return curv

    def forget(self, target: str) -> None:
        """Drop what this object holds of ``target``'s curvature (operator included); the store keeps the files."""
        self._curv.pop(target, None)

    def _cached_diagonal(self, target: str, verdict) -> TargetCurvature | None:
        """The store's diagonal of ``target`` when it is usable as it is (module docstring), else None."""
        if not verdict.usable:
            return None
        tensors, risks, names, meta = load_diagonal(self.diag_path(target))
        probes = tensors.get("probe_diagonals")
        if not ((meta is not None or probes is not None) and (probes is not None or not self.keep_probes)):
            return None
        stderr = tensors.get("stderr")
        return TargetCurvature(target, tensors["diag"].double(), None if stderr is None else stderr.double(), None,
                               None, probes,
                               risks, names, trace=float((meta or {}).get("trace", "nan")),
                               trace_stderr=float((meta or {}).get("trace_stderr", "nan")))

    def _card_provenance(self, target: str, key: str) -> dict:
        return {"key": key, "target": target, "base_hash": self.base_hash, "point": "theta_ft of the target",
                "n_images": self.settings.n_images, "probes": self.settings.probes}

    def risk_sources(self, target: str) -> list[str]:
        """The sources whose per-probe risks a new diagonal of ``target`` accumulates (``sources``, or the
        store's domains with θ_ft and τ* of this run), sorted, without the target."""
        names = self.store.vector_domains() if self.sources is None else self.sources
        return [n for n in sorted(set(names) - {target}) if self.ws.has(n, "ft") and self.ws.has(n, "star")]

    def _source_key(self, source: str) -> str:
        """The content key of τ*ˢ: the keys of τ_ftˢ, τ_ft*ˢ and (``from-ft``) the twin, τ*'s reference."""
        twin = {"ref": self.vector(source, "ref").provenance.get("key", "")} if has_twin(self.ws.variant) else {}
        return content_key({"ft": self.vector(source, "ft").provenance.get("key", ""),
                            "ftx": self.vector(source, "ftx").provenance.get("key", ""), **twin})

    def _squares(self, layout, sources: list[str]) -> torch.Tensor:
        """``(D, S)`` float64 ``τ*ˢ ⊙ τ*ˢ`` of ``sources``, in ``layout``'s flat order."""
        return torch.stack([layout.flatten(self.vector(s, "star").tensors, dtype=torch.float64).pow(2)
                            for s in sources], dim=1)

    def _diagonal_meta(self, target: str, key: str, curv: TargetCurvature) -> dict:
        s = self.settings
        return {"key": key, "target": target, "base_hash": self.base_hash, "trace": curv.trace,
                "trace_stderr": curv.trace_stderr, "probes": s.probes, "seed": s.seed,
                "block_size": DEFAULT_BLOCK_SIZE}

    def _hutchinson(self, op: HessianOperator, sources: list[str]):
        """The target's Hutchinson diagonal with the per-probe risks of ``sources`` (probes never split over
        ranks: the operator is data-parallel, all ranks the same probes, or the ranks work on different
        targets)."""
        s = self.settings
        W = self._squares(op.layout, sources) if sources else None
        return hutchinson_diagonal(op, num_matvecs=s.probes, seed=s.seed, block_size=DEFAULT_BLOCK_SIZE,
                                   progress=self.progress, keep_probes=self.keep_probes, functionals=W,
                                   split_probes=False)

    def _build_diagonal(self, op: HessianOperator, target: str, key: str) -> TargetCurvature:
        """Hutchinson diagonal of Hᵀ with the known sources' per-probe risks and the trace (saved)."""
        sources = self.risk_sources(target)
        est = self._hutchinson(op, sources)
        keys = [self._source_key(src) for src in sources]
        probes = est.probe_diagonals.float().cpu() if self.keep_probes else None
        # rounded as the file keeps it (float32): a fresh and a cached diagonal give the same numbers
        curv = TargetCurvature(target, est.mean.float().double().cpu(), est.stderr.double().cpu(), None, None, probes,
                               {k: est.probe_functionals[:, j].clone() for j, k in enumerate(keys)},
                               dict(zip(keys, sources)), trace=est.total, trace_stderr=est.total_stderr)
        save_diagonal(self.diag_path(target), curv, self._diagonal_meta(target, key, curv))
        return curv

    def probe_risks(self, source: str, target: str) -> torch.Tensor:
        """The ``n`` per-probe risks ``r_k = Σ_i d_k,i τ*ˢ_i²`` of a pair: kept with the target's diagonal, from
        its per-probe diagonals, or by replaying the probes (same seeds and blocks: the same ``d_k``) for this
        source and every other known one missing, then kept in the diagonal file."""
        curv = self.curvature(target)
        key = self._source_key(source)
        if key not in curv.probe_risks and curv.diag_probes is not None:
            tau = curv.card.layout.flatten(self.vector(source, "star").tensors, dtype=torch.float64)
            curv.probe_risks[key], curv.risk_names[key] = probe_risks(curv.diag_probes, tau), source
        if key not in curv.probe_risks:
            known = set(curv.probe_risks)
            missing = [src for src in dict.fromkeys([source, *self.risk_sources(target)])
                       if self._source_key(src) not in known]
            log.info("replaying the %d probes of %s's diagonal for %s", self.settings.probes, target,
                     ", ".join(missing))
            if curv.operator is None:
                curv.operator = self.operator(target)
            est = self._hutchinson(curv.operator, missing)
            for j, src in enumerate(missing):
                k = self._source_key(src)
                curv.probe_risks[k], curv.risk_names[k] = est.probe_functionals[:, j].clone(), src
            save_diagonal(self.diag_path(target), curv, self._diagonal_meta(target, self._curvature_key(target), curv))
        return curv.probe_risks[key]

    # ------------------------------------------------------------------ pairs
    def cosines(self, source: str, target: str) -> PairFeatures:
        """Tier-0 features: cos(τ_ftˢ, τ_ftᵀ) globally and per block, cos(τ*ˢ, τ*ᵀ), and norms.

        All from :func:`diag.features.similarity.vector_similarity` (float64 accumulation) on the
        workspace's vectors. ``cos_star`` needs τ*ᵀ, i.e. the target's explanation labels: it is
        absent (with the reason) when the store has no θ_ft*ᵀ.
        """
        ft = vector_similarity(self.vector(source, "ft"), self.vector(target, "ft"), by="block")
        out = PairFeatures({"cos_ft": ft.cosine, **{f"cos_ft.{g}": c for g, c in ft.group_cosines().items()},
                            "norm_ft_source": ft.norm_a, "norm_ft_target": ft.norm_b})
        star_s = self.vector(source, "star")
        if self.ws.has(target, "star"):
            star = vector_similarity(star_s, self.vector(target, "star"), by="global")
            out.values["cos_star"] = star.cosine
            out.values["norm_star_source"] = star.norm_a
        else:
            out.absent["cos_star"] = f"the store has no θ_ft* of '{target}' (needs its explanation labels)"
            out.values["norm_star_source"] = star_s.norm()
        return out

    def risks(self, source: str, target: str, exact: bool = True) -> dict[str, float]:
        """R(τ*ˢ; Hᵀ) from the card and the diagonal (with ``risk_diag_se`` from the probes), gᵀτ*ˢ
        (``grad_dot_tau``, the card's g), and exact R (one HVP) when ``exact``."""

        curv = self.curvature(target, need_operator=exact)
        tau = curv.card.layout.flatten(self.vector(source, "star").tensors, dtype=torch.float64)
        card = curv.card
        out = {"risk_card": card.risk(tau), "risk_diag": risk_diagonal(curv.diag, tau),
               "risk_diag_se": risk_diagonal_stderr(self.probe_risks(source, target)),
               "grad_dot_tau": card.first_order(tau)}
        if exact:
            out["risk_exact"] = risk_exact(curv.operator, tau.to(curv.operator.dtype))
        return out

    def pair(self, source: str, target: str, curvature: bool = True, exact: bool = True) -> PairFeatures:
        """:func:`pair_features` on this object's caches."""
        return pair_features(self, source, target, curvature=curvature, exact=exact)


@dataclass
class PairFeatures:
    """Diagnostics of one (source, target) pair.

    Attributes:
        values: feature name → value (``cos_ft``, ``cos_ft.<group>``, ``cos_star``, ``norm_*``, ``risk_*``).
        absent: feature name → why it does not apply to this pair (never a silent NaN).
    """

    values: dict[str, float]
    absent: dict[str, str] = field(default_factory=dict)

    def update(self, other: "PairFeatures") -> None:
        self.values.update(other.values)
        self.absent.update(other.absent)

    def absent_text(self) -> str:
        """``name: reason; …`` (the study table's ``absent`` column)."""
        return "; ".join(f"{k}: {v}" for k, v in sorted(self.absent.items()))


def pair_features(diag: Diagnostics, source: str, target: str, curvature: bool = True,
                  exact: bool = True) -> PairFeatures:
    """The features of a (source, target) pair, for the study's rows and rank-sources' candidates alike.

    Cosines and norms always (:meth:`Diagnostics.cosines`); the risks R(τ*ˢ; Hᵀ) card and
    diagonal with ``curvature``, and the exact one (target images) with ``exact`` too.
    Errors propagate; a feature that does not apply is in ``absent`` with its reason.
    """
    out = diag.cosines(source, target)
    if curvature:
        out.values.update(diag.risks(source, target, exact=exact))
        if not exact:
            out.absent["risk_exact"] = "needs labelled target images (tier 2)"
    else:
        out.absent.update({k: "curvature not requested" for k in RISK_COLUMNS})
    return out
