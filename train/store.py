"""The artifact store: the only contract between ``train`` and ``diag``.

Layout (one folder per backbone id)::

    <root>/<backbone-id>/base.safetensors                    CLIP weights (θ_base + text tower)
                        /heads/<domain>.safetensors           W (K×C) and the logit scale
                        /vectors/<domain>/ft.safetensors      τ_ft  = θ_ft  − θ_base
                        /vectors/<domain>/ftx-a0.8.safetensors τ_ft* = θ_ft* − θ_base
                        /vectors/<domain>/ftx-a0.8-fromft.safetensors   θ_ft* continued from θ_ft
                        /vectors/<domain>/s1/...               training seed 1 (seed 0 has no folder)
                        /attributions/<domain>-kernelshap.safetensors   φ for train/val/test
                        /attributions/s1/<domain>-kernelshap.safetensors  φ of seed 1
                        /curvature/<domain>/...               diagonals, cards
                        /studies/<name>/...                   pair tables, figures

Every file carries provenance metadata and a content ``key``: the hash of everything it
was computed from. An artifact whose key matches the requested settings is reused; a
missing or stale one is rebuilt by :mod:`train.zoo`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from train.backbones import Backbone, BackboneConfig, build_clip
from train.errors import ArtifactError, StoreError
from train.model import SelfExplainingCLIP, load_visual_state, visual_state
from train.tensorio import check_writable, dumps, load_tensors, read_metadata, save_tensors
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


def alpha_tag(alpha: float) -> str:
    return f"a{float(alpha):g}"


#: θ_ft* variants: ``paper`` (paired with θ_ft, from θ_base) and ``from-ft`` (continued from θ_ft).
VARIANTS = ("paper", "from-ft")
VARIANT_SUFFIX = {"paper": "", "from-ft": "-fromft"}


def check_variant(variant: str) -> str:
    """``variant`` when it is one of :data:`VARIANTS`."""
    if variant not in VARIANTS:
        from train.errors import unknown

        raise unknown("variant", variant, VARIANTS)
    return variant


def seed_dir(seed: int) -> str:
    """The sub-folder of a training seed: ``""`` for seed 0 (today's layout), else ``s<seed>``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise StoreError(f"seed must be an int >= 0, got {seed!r}")
    return f"s{seed}" if seed else ""


@dataclass(frozen=True)
class Store:
    """Paths and typed readers of one backbone's artifacts."""

    root: Path
    backbone_id: str = "tiny"

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.backbone_id

    # ------------------------------------------------------------------ paths
    def base_path(self) -> Path:
        return self.folder / "base.safetensors"

    def head_path(self, domain: str) -> Path:
        return self.folder / "heads" / f"{domain}.safetensors"

    def vector_path(self, domain: str, kind: str = "ft", alpha: float | None = None, *, seed: int = 0,
                    variant: str = "paper") -> Path:
        """``vectors/<domain>[/s<seed>]/ft`` or ``…/ftx-a<α>[-fromft]`` (seed 0 and ``paper`` add nothing).

        θ_ft is shared by both variants (``variant`` only names θ_ft*).
        """
        check_variant(variant)
        name = "ft" if kind == "ft" else f"ftx-{alpha_tag(alpha)}{VARIANT_SUFFIX[variant]}"
        return self.folder / "vectors" / domain / seed_dir(seed) / f"{name}.safetensors"

    def attribution_path(self, domain: str, method: str = "kernelshap", *, seed: int = 0) -> Path:
        """``attributions[/s<seed>]/<domain>-<method>`` (φ on the seed's θ_ft)."""
        return self.folder / "attributions" / seed_dir(seed) / f"{domain}-{method}.safetensors"

    def curvature_dir(self, domain: str) -> Path:
        return self.folder / "curvature" / domain

    def study_dir(self, name: str) -> Path:
        return self.folder / "studies" / name

    def check_writable(self) -> None:
        check_writable(self.folder)

    # ------------------------------------------------------------- freshness
    @staticmethod
    def is_fresh(path: Path, key: str) -> bool:
        """True when ``path`` exists and was built from ``key`` (False: missing or stale settings).

        Raises:
            ArtifactError: the file exists but is corrupt, truncated or a pickle — it is never
                silently overwritten; the user decides what to do with it.
        """
        if not path.is_file():
            return False
        return read_metadata(path).get("key") == key

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
        """τ* = τ_ft* − τ_ft = θ_ft* − θ_ft (eq. 7), for both variants (θ_ft of the same seed)."""
        star = (self.load_vector(domain, "ftx", alpha, expect_base, seed=seed, variant=variant)
                - self.load_vector(domain, "ft", None, expect_base, seed=seed))
        return TaskVector(star.tensors, star.base_hash, {"kind": "explainability", "domain": domain, "alpha": str(alpha),
                                                         "seed": str(seed), "variant": variant})

    # ----------------------------------------------------------- attributions
    def load_attributions(self, domain: str, method: str = "kernelshap", *, seed: int = 0) -> dict[str, torch.Tensor]:
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


__all__ = ["Store", "default_root", "content_key", "base_state", "visual_state", "StoreError", "VARIANTS",
           "check_variant", "seed_dir"]
