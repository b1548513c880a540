"""What every command shares: the store, the zoo settings, building missing artifacts, and
the :class:`Workspace` of loaded artifacts.

``diag`` reads artifacts from the store; when a mini-suite artifact is missing it asks the
training core's zoo to build it (with progress). This is the only place ``diag`` reaches
into ``train``'s build code, and it does so lazily.

:class:`Workspace` is the one object that holds θ_base (the backbone and its hash), an LRU
of task vectors, the models per target head and the target image sets; the study,
:class:`diag.features.pair_features.Diagnostics` and the ranking share one instead of reloading θ_base.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from diag.constants import PAPER_ALPHA
from diag.runtime.shards import build_domains
from diag.runtime.workers import resolve_workers
from train.datasets import available_domains, MINISUITE, model_inputs
from train.devices import check_bf16, resolve_device
from train.errors import ArtifactError, unknown
from train.store import base_state, check_variant, seed_dir, Store
from train.tensorio import read_metadata
from train.vectors import TaskVector
from train.zoo import preset, Zoo

#: what :meth:`Workspace.vector` reads
VECTOR_KINDS = ("ft", "ftx", "star", "ref")


@dataclass
class Context:
    """Store location, zoo preset, backbone and device choice of one CLI invocation.

    ``device`` (``auto`` when None) is resolved once here (:func:`train.devices.resolve_device`)
    and passed to the zoo and every workspace; ``bf16`` (CUDA only) to the zoo's forwards.
    ``workers`` (``auto`` when None): local processes of the long builds (:mod:`diag.runtime.workers`).
    ``backbone`` None is the preset's (:data:`train.zoo.PRESETS`); a name, a ``pretrained`` tag or a
    ``checkpoint`` replaces the preset's backbone.
    """

    store_root: Path
    preset: str = "default"
    backbone: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    data: dict[str, str] | None = None
    progress: bool = True
    rebuild: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    device: str | torch.device | None = None
    bf16: bool = False
    workers: int | None = 1

    def __post_init__(self):
        self.device = resolve_device(self.device)
        check_bf16(self.device, self.bf16)
        self.workers = resolve_workers(self.workers, self.device)

    def zoo_config(self):
        cfg = preset(self.preset)
        if self.backbone or self.pretrained or self.checkpoint:
            cfg = replace(cfg, backbone=self.backbone or cfg.backbone, pretrained=self.pretrained,
                          checkpoint=self.checkpoint)
        return cfg

    @property
    def store(self) -> Store:
        cfg = self.zoo_config()
        bid = cfg.backbone_id if self.preset == "default" else f"{cfg.backbone_id}-{self.preset}"
        return Store(self.store_root, bid, rebuild=frozenset(self.rebuild), rebuild_before=self.started,
                     supervision=cfg.supervision)

    def zoo(self, seed: int = 0):
        """The zoo of this invocation for training seed ``seed`` (one per seed; θ_base is shared)."""
        zoos = self.__dict__.setdefault("_zoos", {})
        if seed not in zoos:
            zoos[seed] = Zoo(self.store, replace(self.zoo_config(), seed=int(seed)), progress=self.progress,
                             data=self.data, device=self.device, bf16=self.bf16)
        return zoos[seed]

    def ensure(self, domains: list[str], alphas: tuple[float, ...] = (PAPER_ALPHA,), explain: bool = True, *,
               variants: tuple[str, ...] = ("paper",), seeds: tuple[int, ...] = (0,)) -> Store:
        """Build whatever is missing for ``domains`` (head, θ_ft, φ, θ_ft* of each α, variant and seed).

        Under torchrun the domains are split over the ranks (:func:`diag.runtime.shards.build_domains`).

        Returns:
            The store.
        """
        build_domains(self, domains, alphas, explain, variants, seeds)
        return self.store

    def provenance(self, domains: list[str], alphas: tuple[float, ...] = (PAPER_ALPHA,), *,
                   variants: tuple[str, ...] = ("paper",), seeds: tuple[int, ...] = (0,)) -> list[dict]:
        """Per domain, seed and artifact (θ_ft, φ, θ_ft* of each α and variant) after :meth:`ensure`: one row
        ``{domain, seed, artifact, what, origin: built|imported, sha256[, input_sha256]}`` (sha256 of the store's file)."""
        return [{"domain": d, "seed": s, "artifact": k, "what": v.what, **v.record()}
                for d in domains for s in seeds
                for k, v in self.zoo(s).plan(d, tuple(alphas), tuple(variants)).items() if k != "head"]

    def domains(self) -> list[str]:
        """Domains of the suite: the mini-suite plus any given with ``--data``."""
        return list(MINISUITE) + [d for d in (self.data or {}) if d not in MINISUITE]

    def workspace(self, alpha: float = PAPER_ALPHA, *, seed: int = 0, variant: str = "paper") -> "Workspace":
        """The :class:`Workspace` of this invocation's store for one (α, seed, variant) (θ_base loaded once)."""
        return Workspace(self.store, alpha, self.data, seed=seed, variant=variant, device=self.device)

    def check_domain(self, name: str) -> str:
        known = set(self.domains()) | set(available_domains())
        if name not in known:
            raise unknown("domain", name, known)
        return name


# ------------------------------------------------------------------------------ workspace


@dataclass
class TargetSet:
    """Images of one split of a domain with the stored ground-truth φ (test, or val when asked for) or without.

    Attributes:
        name: domain.
        split: ``test`` (scored, with φ) or ``val`` (choices; ``phi`` None unless the φ-aligned set was asked for).
        x, y: model inputs (N, 3, H, W) and labels (N,).
        phi: Kernel SHAP φ of the labelled class (N, M), aligned with ``x``; None on ``val``.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    phi: torch.Tensor | None
    split: str = "test"


class _LRU:
    """A small least-recently-used cache."""
    def __init__(self, limit: int):
        self.limit = limit
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable, make: Callable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return value


class Workspace:
    """θ_base, its hash, task vectors (LRU), models and target sets of one store, for one run.

    A *run* is (α, training seed, variant of θ_ft*): every vector, the test ground truth φ
    (Kernel SHAP on that seed's θ_ftᵀ) and the mean φ maps are read for it.
    :meth:`for_run` gives the workspace of another run sharing θ_base and every cache.

    Args:
        store: the artifact store.
        alpha: α of θ_ft* (τ* = θ_ft* − θ_ft at this α).
        data: domain → local dataset path (domains outside the mini-suite).
        max_vectors: vectors kept in memory (default: 48 for a small backbone, 4 for > 5e7 parameters).
        max_sets: image sets (and their models) kept in memory.
        seed: training seed of θ_ft, φ and θ_ft* (and the seed of the controls).
        variant: variant of θ_ft* (:data:`train.store.VARIANTS`).
        device: where models and target images live (:func:`train.devices.resolve_device`; default
            ``auto``); results of :func:`diag.transfer.evaluate.predict` come back on the CPU.
    """

    def __init__(self, store: Store, alpha: float = PAPER_ALPHA, data: dict | None = None,
                 max_vectors: int | None = None, max_sets: int = 8, *, seed: int = 0, variant: str = "paper",
                 device: str | torch.device | None = None):
        self.store = store
        self.device = resolve_device(device)
        self.alpha = float(alpha)
        self.data = dict(data or {})
        self.seed = int(seed)
        self.variant = check_variant(variant)
        seed_dir(self.seed)  # refuses a negative or non-integer seed
        self._max_vectors = max_vectors
        self._sets = _LRU(max_sets)
        self._models: dict[str, torch.nn.Module] = {}
        self._mean_maps: dict[tuple, torch.Tensor] = {}
        self._shared: dict = {}  # θ_base and the vector LRU, loaded on first use and shared by for_run's copies

    def for_run(self, *, alpha: float | None = None, seed: int | None = None,
                variant: str | None = None) -> "Workspace":
        """This workspace for another (α, seed, variant): θ_base, models and caches are shared (θ_base loads on
        first use by any of them: a run answered from caches never loads it)."""
        other = copy.copy(self)
        other.alpha = self.alpha if alpha is None else float(alpha)
        other.seed = self.seed if seed is None else int(seed)
        other.variant = self.variant if variant is None else check_variant(variant)
        seed_dir(other.seed)
        return other

    @property
    def run(self) -> tuple[float, int, str]:
        """(α, seed, variant) of this workspace."""
        return self.alpha, self.seed, self.variant

    # ------------------------------------------------------------------- base
    @cached_property
    def base_hash(self) -> str:
        """θ_base's hash, read from the base file's header (the weights load only when needed)."""
        meta = read_metadata(self.store.base_path())
        if "base_hash" not in meta:
            raise ArtifactError(f"{self.store.base_path()} has no base_hash in its metadata")
        return meta["base_hash"]

    def _once(self, name: str, make):
        """``make()`` on first use, then the same object, for this workspace and its :meth:`for_run` copies."""
        if name not in self._shared:
            self._shared[name] = make()
        return self._shared[name]

    @property
    def backbone(self):
        """The CLIP backbone stored as θ_base (loaded once, on first use, for this workspace and its copies)."""
        return self._once("backbone", self._load_backbone)

    def _load_backbone(self):
        backbone, base_hash = self.store.load_base()
        if base_hash != self.base_hash:
            raise ArtifactError(f"{self.store.base_path()} changed while in use")
        return backbone

    @property
    def base(self) -> dict:
        """θ_base as a ``visual.*`` state dict."""
        return self._once("base", lambda: base_state(self.backbone))

    @property
    def _vectors(self) -> _LRU:
        return self._once("vectors", self._new_vector_cache)

    def _new_vector_cache(self) -> _LRU:
        n_params = sum(v.numel() for v in self.base.values())
        return _LRU(self._max_vectors or (48 if n_params < 5e7 else 4))

    # ---------------------------------------------------------------- vectors
    def vector(self, domain: str, kind: str):
        """τ_ft (``ft``), τ_ft* (``ftx``), τ* (``star``, the store's ``explainability_vector``) or the τ of τ*'s
        reference (``ref``: τ_ft, or the twin of ``from-ft``; :meth:`train.store.Store.reference_path`) of this run."""
        run = {"seed": self.seed, "variant": self.variant}

        def make():
            if kind == "star":
                return self.store.explainability_vector(domain, self.alpha, self.base_hash, **run)
            if kind == "ft":
                return self.store.load_vector(domain, "ft", None, expect_base=self.base_hash, seed=self.seed)
            if kind == "ftx":
                return self.store.load_vector(domain, "ftx", self.alpha, expect_base=self.base_hash, **run)
            if kind == "ref":
                return TaskVector.load(self.store.reference_path(domain, **run), expect_base=self.base_hash)
            raise unknown("vector kind", kind, VECTOR_KINDS)
        key = (domain, kind, self.seed) if kind == "ft" else (domain, kind, self.alpha, self.seed, self.variant)
        return self._vectors.get(key, make)

    def cached(self, key: Hashable, make: Callable):
        """Any derived vector (e.g. the random controls of a pair), in the same LRU (put the run in ``key``)."""
        return self._vectors.get(key, make)

    def vector_path(self, domain: str, kind: str):
        """The store file of this run's ``ft``, ``ftx`` or ``ref`` vector (``ref``: τ*'s reference)."""
        if kind == "ft":
            return self.store.vector_path(domain, "ft", seed=self.seed)
        if kind == "ref":
            return self.store.reference_path(domain, seed=self.seed, variant=self.variant)
        return self.store.vector_path(domain, kind, self.alpha, seed=self.seed, variant=self.variant)

    def attribution_path(self, domain: str):
        """The store file of this seed's φ of ``domain``."""
        return self.store.attribution_path(domain, seed=self.seed)

    def has(self, domain: str, kind: str) -> bool:
        """Whether the store holds ``domain``'s ``ft``, ``ftx`` or ``ref`` vector of this run (``star``: ftx and ref)."""
        if kind == "star":
            return self.has(domain, "ftx") and self.has(domain, "ref")
        return self.vector_path(domain, kind).is_file()

    def state(self, vector=None, scale: float = 1.0) -> dict:
        """θ_base + scale·τ as a state dict (θ_base itself when ``vector`` is None)."""
        if vector is None:
            return self.base
        return vector.apply_to(self.base, scale=scale, base_hash=self.base_hash)

    # ------------------------------------------------------------------ models
    def model(self, domain: str):
        """The self-explaining model with ``domain``'s head (one per domain; θ is loaded per use)."""
        if domain not in self._models:
            self._models[domain] = self.store.model(domain, None, backbone=self.backbone).to(self.device)
        return self._models[domain]

    # ------------------------------------------------------------------- data
    def target_set(self, domain: str, split: str = "test", limit: int | None = None,
                   explained: bool = False) -> TargetSet:
        """``split`` images of ``domain``; on ``test`` (and on ``val`` with ``explained``) the images this seed's
        φ covers (the first N), with that φ; otherwise the first ``limit`` images without φ."""
        def make():
            if split == "test" or explained:
                attr = self.store.load_attributions(domain, seed=self.seed)
                if split not in attr:
                    raise ArtifactError(f"Stored attributions of '{domain}' have no '{split}' split")
                phi, labels = attr[split], attr[f"{split}_labels"].long()
                x, y = model_inputs(self.backbone.config, domain, split, phi.shape[0], self.data.get(domain))
                if len(y) < phi.shape[0] or not torch.equal(y, labels):
                    raise ArtifactError(f"Stored attributions of '{domain}' (seed {self.seed}) do not match its "
                                        f"{split} split; rebuild them")
                return TargetSet(domain, x, labels, phi, split)
            x, y = model_inputs(self.backbone.config, domain, split, limit, self.data.get(domain))
            return TargetSet(domain, x, y, None, split)
        key = (domain, split, limit, self.seed) if split == "test" or explained else (domain, split, limit)
        return self._sets.get(key, make)

    def mean_map(self, domain: str) -> torch.Tensor:
        """Mean φ map (M,) of ``domain``'s training attributions of this seed (the data-free prior)."""
        key = (domain, self.seed)
        if key not in self._mean_maps:
            self._mean_maps[key] = self.store.load_attributions(domain, seed=self.seed)["train"].mean(dim=0)
        return self._mean_maps[key]
