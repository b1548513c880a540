"""The artifact store: the only contract between ``train`` and ``diag``.

Layout (one folder per backbone id)::

    <root>/<backbone-id>/base.safetensors                    CLIP weights (θ_base + text tower)
                        /heads/<domain>.safetensors           W (K×C) and the logit scale
                        /vectors/<domain>/ft.safetensors      τ_ft  = θ_ft  − θ_base
                        /vectors/<domain>/ftx-a0.8.safetensors τ_ft* = θ_ft* − θ_base
                        /vectors/<domain>/ftx-a0.8-fromft.safetensors   θ_ft* continued from θ_ft
                        /vectors/<domain>/ftx-a1-fromft.safetensors     its twin (same continuation, α = 1)
                        /vectors/<domain>/s1/...               training seed 1 (seed 0 has no folder)
                        /attributions/<domain>-kernelshap.safetensors   φ for train/val/test
                        /attributions/s1/<domain>-kernelshap.safetensors  φ of seed 1
                        /curvature/<domain>/<kind>-<key>.safetensors  diagonals, cards (keyed by settings)
                        /studies/<name>/...                   pair tables, figures

Every file carries provenance metadata and a content ``key``: the hash of everything it
was computed from. :meth:`Store.decide` decides what happens to an existing file:
missing → build; tvdiag's with the requested key → reuse; tvdiag's with a stale key on
the same base → rebuild over it; imported (``diag import``) → keep, and build what is missing
from it; no provenance key, or taken from another base → refuse (exit 2), since it is the
user's file: ``--rebuild DOMAIN`` (``Store.rebuild``) or deleting it lets tvdiag replace it
(:mod:`train.ownership`, the one decision every writer makes).

Every path goes through :meth:`Store._path`: user-given names must match
``[a-z0-9][a-z0-9_-]*`` and a path that resolves outside the store root is refused.
Cached curvature is keyed by its settings (:meth:`Store.curvature_path`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from train.backbones import Backbone, BackboneConfig, build_clip
from train.errors import ArtifactError, StoreError, TvdiagError, unknown
from train.model import load_visual_state, SelfExplainingCLIP, visual_state
from train.ownership import decide, Verdict
from train.tensorio import check_writable, dumps, load_tensors, read_metadata, save_tensors, sweep_stale_tmp
from train.vectors import TaskVector


def default_root() -> Path:
    """``$TVDIAG_STORE``, else ``$XDG_CACHE_HOME/tvdiag``, else ``~/.cache/tvdiag``."""
    if os.environ.get("TVDIAG_STORE"):
        return Path(os.environ["TVDIAG_STORE"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tvdiag"


def content_key(payload: dict) -> str:
    """sha256 (16 hex) of a canonical JSON payload: the identity of an artifact's inputs."""
    return hashlib.sha256(dumps(payload).encode()).hexdigest()[:16]


NAME_PATTERN = r"[a-z0-9][a-z0-9_-]*"
_NAME = re.compile(NAME_PATTERN + r"\Z")
_BACKBONE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
MAX_NAME = 64


def check_name(value: str, kind: str = "domain") -> str:
    """A user-given name (domain, method, study, …) that is safe as one path component.

    Raises:
        TvdiagError: ``value`` does not match ``[a-z0-9][a-z0-9_-]*`` (≤ 64 characters).
    """
    if not isinstance(value, str) or len(value) > MAX_NAME or not _NAME.match(value):
        raise TvdiagError(f"Invalid {kind} name {value!r}: use lowercase letters, digits, '_' and '-', "
                          f"starting with a letter or digit (at most {MAX_NAME} characters)")
    return value


def alpha_tag(alpha: float) -> str:
    if alpha is None or not math.isfinite(float(alpha)):
        raise TvdiagError(f"alpha must be a finite number, got {alpha}")
    return f"a{float(alpha):g}"


#: θ_ft* variants, each with the θ_ft* file it reads and the reference its τ* is measured against:
#: ``paper`` — from θ_base with the pair's optimiser; τ* = θ_ft* − θ_ft (θ_ft is its α = 1 run).
#: ``from-ft`` — continued from θ_ft with the ``from_ft`` optimiser; τ* = θ_ft* − θ_twin, the *twin* being
#: the same continuation (start, batches, seed, steps) at α = 1 (:data:`TWIN_ALPHA`), so the two differ in α only.
#: ``from-ft-raw`` — the same θ_ft* file as ``from-ft``, τ* = θ_ft* − θ_ft: the extra classification steps
#: of the continuation are in it (kept to report both).
VARIANTS = ("paper", "from-ft", "from-ft-raw")
#: the trained θ_ft* (file and recipe) of each variant
TRAINED = {"paper": "paper", "from-ft": "from-ft", "from-ft-raw": "from-ft"}
VARIANT_SUFFIX = {"paper": "", "from-ft": "-fromft"}
#: α of the twin: θ_ft* of ``from-ft`` at α = 1 (``ftx-a1-fromft``), the reference of the ``from-ft`` τ*
TWIN_ALPHA = 1.0


def check_variant(variant: str) -> str:
    """``variant`` when it is one of :data:`VARIANTS`."""
    if variant not in VARIANTS:
        raise unknown("variant", variant, VARIANTS)
    return variant


def trained_variant(variant: str) -> str:
    """The variant whose θ_ft* file ``variant`` reads (``from-ft-raw`` reads ``from-ft``'s)."""
    return TRAINED[check_variant(variant)]


def has_twin(variant: str) -> bool:
    """Whether τ* of ``variant`` is measured against its α = 1 twin rather than θ_ft."""
    return check_variant(variant) == "from-ft"


def seed_dir(seed: int) -> str:
    """The sub-folder of a training seed: ``""`` for seed 0 (today's layout), else ``s<seed>``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise StoreError(f"seed must be an int >= 0, got {seed!r}")
    return f"s{seed}" if seed else ""


@dataclass(frozen=True)
class Store:
    """Paths and typed readers of one backbone's artifacts.

    Every path is built by :meth:`_path`, which validates each user-given name and refuses
    a path that resolves outside ``root``. ``rebuild`` names domains (or ``all``) whose
    artifacts written before ``rebuild_before`` (a Unix time) are rebuilt even when they
    are fresh or were not written by tvdiag.
    """

    root: Path
    backbone_id: str = "tiny"
    rebuild: frozenset = frozenset()
    rebuild_before: float = 0.0
    #: the explanation supervision this store's φ files hold (``kernelshap`` or ``gradcam``);
    #: readers that do not name a method get this one.
    supervision: str = "kernelshap"

    def __post_init__(self):
        if not _BACKBONE_ID.match(self.backbone_id) or ".." in self.backbone_id or len(self.backbone_id) > 128:
            raise TvdiagError(f"Invalid store folder name {self.backbone_id!r} (backbone id): use letters, digits, "
                              "'.', '_', '+' and '-' (rename the checkpoint file if it comes from its name)")
        object.__setattr__(self, "rebuild", frozenset(check_name(d, "--rebuild domain") if d != "all" else d
                                                      for d in self.rebuild))

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.backbone_id

    def _path(self, *parts: str) -> Path:
        """``folder / parts…``, refused unless it resolves inside the store root (the one choke point)."""
        path = self.folder.joinpath(*parts)
        root = Path(self.root).expanduser().resolve()
        resolved = path.expanduser().resolve()
        if resolved != root and root not in resolved.parents:
            raise StoreError(f"Refusing path {path}: it resolves to {resolved}, outside the store {root}")
        return path

    # ------------------------------------------------------------------ paths
    def base_path(self) -> Path:
        return self._path("base.safetensors")

    def head_path(self, domain: str) -> Path:
        return self._path("heads", f"{check_name(domain)}.safetensors")

    def vector_path(self, domain: str, kind: str = "ft", alpha: float | None = None, *, seed: int = 0,
                    variant: str = "paper") -> Path:
        """``vectors/<domain>[/s<seed>]/ft`` or ``…/ftx-a<α>[-fromft]`` (seed 0 and ``paper`` add nothing).

        θ_ft is shared by both variants (``variant`` only names θ_ft*).
        """
        if kind not in ("ft", "ftx"):
            raise TvdiagError(f"Unknown vector kind '{kind}'. Available: ft, ftx")
        name = "ft" if kind == "ft" else f"ftx-{alpha_tag(alpha)}{VARIANT_SUFFIX[trained_variant(variant)]}"
        return self._path("vectors", check_name(domain), seed_dir(seed), f"{name}.safetensors")

    def reference_path(self, domain: str, *, seed: int = 0, variant: str = "paper") -> Path:
        """The θ that τ* of ``variant`` is measured against: θ_ft, or the twin of ``from-ft`` (:data:`VARIANTS`)."""
        if has_twin(variant):
            return self.vector_path(domain, "ftx", TWIN_ALPHA, seed=seed, variant=variant)
        return self.vector_path(domain, "ft", seed=seed)

    def vector_domains(self) -> list[str]:
        """The domains with a folder under ``vectors/`` (valid names only), sorted."""
        folder = self._path("vectors")
        names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        return sorted(n for n in names if len(n) <= MAX_NAME and _NAME.match(n))

    def attribution_path(self, domain: str, method: str | None = None, *, seed: int = 0) -> Path:
        """``attributions[/s<seed>]/<domain>-<method>`` (φ on the seed's θ_ft; method: the store's supervision)."""
        method = method or self.supervision
        return self._path("attributions", seed_dir(seed),
                          f"{check_name(domain)}-{check_name(method, 'method')}.safetensors")

    def curvature_dir(self, domain: str) -> Path:
        return self._path("curvature", check_name(domain))

    def curvature_path(self, domain: str, kind: str, settings: dict) -> Path:
        """Cached curvature of ``domain`` keyed by its settings: ``curvature/<domain>/<kind>-<key>.safetensors``.

        ``key`` is :func:`content_key` of ``settings`` (e.g. probes, k, n_images, seed), so a
        cheaper run never replaces the file a run with other settings wrote.
        """
        name = f"{check_name(kind, 'curvature kind')}-{content_key(settings)}.safetensors"
        return self._path("curvature", check_name(domain), name)

    def study_dir(self, name: str) -> Path:
        return self._path("studies", check_name(name, "study"))

    def check_writable(self) -> None:
        """Raise unless the store folder can be written; removes temporaries of dead writers."""
        check_writable(self.folder)
        sweep_stale_tmp(self.folder, recursive=True)

    # ------------------------------------------------------------- freshness
    def rebuilds(self, path: Path) -> bool:
        """True when ``--rebuild`` covers ``path`` and the file predates this run."""
        if not self.rebuild or path.stat().st_mtime >= self.rebuild_before:
            return False
        return "all" in self.rebuild or self._domain_of(path) in self.rebuild

    def _domain_of(self, path: Path) -> str | None:
        """The domain an artifact belongs to (``base`` for θ_base; None: an unknown file)."""
        parts = path.relative_to(self.folder).parts
        if parts == ("base.safetensors",):
            return "base"
        if len(parts) >= 3 and parts[0] in ("vectors", "curvature"):
            return parts[1]
        if len(parts) == 2 and parts[0] == "heads":
            return parts[1].removesuffix(".safetensors")
        if len(parts) in (2, 3) and parts[0] == "attributions":  # attributions[/s<seed>]/<domain>-<method>
            stem = parts[-1].removesuffix(".safetensors")
            hits = [d for d in self.rebuild if stem.startswith(f"{d}-")]
            return max(hits, key=len) if hits else stem.rsplit("-", 1)[0]
        return None

    def _refuse(self, path: Path, why: str) -> ArtifactError:
        domain = self._domain_of(path)
        how = f"pass --rebuild {domain} to replace it, or delete it" if domain else "delete it to rebuild"
        return ArtifactError(f"{path} {why}; tvdiag does not overwrite it: {how}")

    def _current_base_hash(self) -> str | None:
        path = self.base_path()
        return read_metadata(path).get("base_hash") if path.is_file() else None

    def decide(self, path: Path, key: str, **how) -> Verdict:
        """:func:`train.ownership.decide` for a file of this store: reuse, keep, build, build from, or refuse."""
        return decide(path, key, store=self, **how)

    def is_fresh(self, path: Path, key: str) -> bool:
        """Whether the artifact at ``path`` is read as is for content key ``key`` (:meth:`decide`).

        missing → False (build); tvdiag's with key ``key`` → True (reuse); imported → True (kept,
        never replaced); tvdiag's with another key, same base → False (rebuild over it); covered
        by ``--rebuild`` → False.

        Raises:
            ArtifactError: the file is corrupt, truncated or a pickle; it has no tvdiag
                provenance; or it was taken from another base than the store's.
                It is the user's file and is never silently overwritten.
        """
        return self.decide(path, key).usable

    # ------------------------------------------------------------------- base
    def save_base(self, backbone: Backbone, provenance: dict) -> str:
        base_hash = backbone.weights_hash()
        meta = {**{k: str(v) for k, v in provenance.items()}, "config": backbone.config.to_json(),
                "base_hash": base_hash}
        save_tensors(self.base_path(), backbone.clip.state_dict(), meta)
        return base_hash

    def load_base(self) -> tuple[Backbone, str]:
        """The CLIP model stored as base, rebuilt from the config in its metadata."""
        from open_clip.tokenizer import SimpleTokenizer
        import open_clip

        tensors, meta = load_tensors(self.base_path())
        if "config" not in meta:
            raise ArtifactError(f"{self.base_path()} has no config in its metadata")
        config = BackboneConfig.from_json(meta["config"])
        clip = build_clip(config)
        missing, unexpected = clip.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ArtifactError(f"{self.base_path()} does not match its config ({len(missing)} missing keys)")
        clip.eval()
        tokenizer = (open_clip.get_tokenizer(config.name) if config.name in open_clip.list_models()
                     else SimpleTokenizer(context_length=int(config.text_cfg.get("context_length", 77))))
        backbone = Backbone(config=config, clip=clip, tokenizer=tokenizer)
        return backbone, meta["base_hash"]

    # ------------------------------------------------------------------ heads
    def save_head(self, domain: str, head: torch.Tensor, logit_scale: float, provenance: dict) -> None:
        save_tensors(self.head_path(domain), {"head": head, "logit_scale": torch.tensor(float(logit_scale))},
                     {k: str(v) for k, v in provenance.items()})

    def load_head(self, domain: str) -> tuple[torch.Tensor, float]:
        tensors, _ = load_tensors(self.head_path(domain))
        return tensors["head"], float(tensors["logit_scale"])

    # ---------------------------------------------------------------- vectors
    def load_vector(self, domain: str, kind: str = "ft", alpha: float | None = None,
                    expect_base: str | None = None, *, seed: int = 0, variant: str = "paper") -> TaskVector:
        return TaskVector.load(self.vector_path(domain, kind, alpha, seed=seed, variant=variant),
                               expect_base=expect_base)

    def explainability_vector(self, domain: str, alpha: float, expect_base: str | None = None, *, seed: int = 0,
                              variant: str = "paper") -> TaskVector:
        """τ* = θ_ft* − θ_ref (eq. 7): θ_ref = θ_ft of the same seed, or the twin for ``from-ft`` (:meth:`reference_path`)."""
        ftx = self.load_vector(domain, "ftx", alpha, expect_base, seed=seed, variant=variant)
        ref = TaskVector.load(self.reference_path(domain, seed=seed, variant=variant), expect_base=expect_base)
        if has_twin(variant) and "imported_from" in ftx.provenance and "imported_from" not in ref.provenance:
            raise ArtifactError(f"{domain}: θ_ft* of from-ft was imported, its twin was built by tvdiag's recipe, which "
                                "need not be the import's: use --variant from-ft-raw (τ* against θ_ft) or import "
                                "the twin (diag import --kind ftx --alpha 1 --variant from-ft)")
        star = ftx - ref
        return TaskVector(star.tensors, star.base_hash, {"kind": "explainability", "domain": domain, "alpha": str(alpha),
                                                         "seed": str(seed), "variant": variant})

    def register_imported(self, vector: TaskVector, domain: str, kind: str, alpha: float | None = None, *,
                          seed: int = 0, variant: str = "paper") -> tuple[Path, bool]:
        """Store an imported τ (:func:`train.external_weights.import_weights`) as ``domain``'s ``ft`` or ``ftx``; ``star`` too.

        A bare explainability vector τ* (``kind="star"``) is stored as τ_ft* = τ_ft + τ* next to
        the domain's τ_ft, so every reader finds τ* = τ_ft* − τ_ft. The file's ``key`` is the hash
        of the imported file, its kind and the base; :meth:`decide` keeps it (never replaced without ``--rebuild``).
        Returns ``(path, written)``; re-importing the same file writes nothing.

        Raises:
            ArtifactError: ``star`` without the domain's τ_ft; the path already holds another
                vector (pass ``--rebuild DOMAIN`` or delete it).
        """
        stored_kind = "ftx" if kind == "star" else kind
        path = self.vector_path(domain, stored_kind, alpha, seed=seed, variant=variant)
        prov = {**vector.provenance, "domain": check_name(domain), "seed": str(seed)}
        parts = {"sha256": prov.get("sha256", ""), "kind": kind, "base": vector.base_hash, "alpha": alpha,
                 "variant": variant}
        tensors = dict(vector.tensors)
        if kind == "star":
            ft_path = self.vector_path(domain, "ft", seed=seed)
            if not ft_path.is_file():
                raise ArtifactError(f"{domain} has no τ_ft in the store ({ft_path}): import its θ_ft first "
                                    "(diag import --kind ft), then the explainability vector")
            ft = TaskVector.load(ft_path, expect_base=vector.base_hash)
            ft._compatible(vector)
            tensors = {k: ft.tensors[k] + v for k, v in vector.tensors.items()}
            parts["ft"] = ft.provenance.get("key", "")
            prov["stored_as"] = "tau_ft + tau_star"
        if kind in ("ftx", "star"):
            prov["alpha"] = str(alpha)
        key = content_key(parts)
        verdict = self.decide(path, key)
        if verdict.usable and verdict.key == key:
            return path, False
        if path.is_file() and not self.rebuilds(path):
            raise self._refuse(path, f"already holds another vector (key {read_metadata(path).get('key')})")
        TaskVector(tensors, vector.base_hash, {**prov, "key": key}).save(path)
        return path, True

    # ----------------------------------------------------------- attributions
    def load_attributions(self, domain: str, method: str | None = None, *, seed: int = 0) -> dict[str, torch.Tensor]:
        tensors, _ = load_tensors(self.attribution_path(domain, method, seed=seed))
        return tensors

    # ------------------------------------------------------------------ models
    def model(self, domain: str, state: dict[str, torch.Tensor] | None = None,
              backbone: Backbone | None = None) -> SelfExplainingCLIP:
        """A self-explaining model for ``domain``'s head with θ = ``state`` (θ_base when None)."""
        if backbone is None:
            backbone, _ = self.load_base()
        head, scale = self.load_head(domain)
        model = SelfExplainingCLIP(_clone_visual(backbone), head, scale)
        if state is not None:
            load_visual_state(model, state)
        model.eval()
        return model


def _clone_visual(backbone: Backbone):
    import copy

    return copy.deepcopy(backbone.clip.visual)


def base_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """θ_base of a backbone as a ``visual.*`` state dict (detached copies)."""
    return {f"visual.{k}": v.detach().clone() for k, v in backbone.clip.visual.state_dict().items()}


__all__ = ["Store", "default_root", "content_key", "check_name", "NAME_PATTERN", "base_state", "visual_state",
           "StoreError", "VARIANTS", "check_variant", "seed_dir", "trained_variant", "has_twin", "TWIN_ALPHA"]
