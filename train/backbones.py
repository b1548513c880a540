"""Backbones: open_clip models resolved by name + pretrained tag, a local checkpoint, or tvdiag's own configs.

A :class:`Backbone` bundles what the rest of the package needs from a CLIP model: the
vision tower (θ lives there), the text tower (to build class heads), the tokenizer,
the input resolution and normalisation.

Weights resolve in this order (STYLE §5): a local checkpoint path (safetensors first;
``torch.load(..., weights_only=True)`` for legacy ``.pt``/``.bin`` files), else an
open_clip pretrained tag resolved only from open_clip's local cache (offline: nothing is
ever downloaded), else random initialisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from train.errors import ArtifactError, UnknownNameError, unknown

if TYPE_CHECKING:  # open_clip costs seconds to import: loaded on first use (a cached decision never needs it)
    from open_clip.model import CLIP

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of a CLIP model, as in open_clip's ``model_configs/*.json``."""

    name: str
    embed_dim: int
    vision_cfg: dict[str, Any]
    text_cfg: dict[str, Any]
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    @property
    def image_size(self) -> int:
        size = self.vision_cfg.get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])

    @property
    def patch_size(self) -> int:
        return int(self.vision_cfg.get("patch_size", 16))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "embed_dim": self.embed_dim, "vision_cfg": self.vision_cfg,
             "text_cfg": self.text_cfg, "mean": list(self.mean), "std": list(self.std)},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "BackboneConfig":
        raw = json.loads(text)
        return cls(name=raw["name"], embed_dim=raw["embed_dim"], vision_cfg=raw["vision_cfg"],
                   text_cfg=raw["text_cfg"], mean=tuple(raw["mean"]), std=tuple(raw["std"]))


def local_configs() -> list[str]:
    """Names of the configs shipped with tvdiag (``train/model_configs``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def available_backbones() -> list[str]:
    """Every name :func:`load_config` accepts: tvdiag's own configs and open_clip's."""
    import open_clip

    return local_configs() + sorted(open_clip.list_models())


def load_config(name: str) -> BackboneConfig:
    """Resolve a backbone name to its architecture config.

    Raises:
        UnknownNameError: the name is neither a tvdiag nor an open_clip config.
    """
    path = CONFIG_DIR / f"{name}.json"
    if path.is_file():
        raw = json.loads(path.read_text())
    else:
        import open_clip

        raw = open_clip.get_model_config(name)
        if raw is None:
            shown = local_configs() + [n for n in open_clip.list_models() if n.startswith("ViT")][:12]
            raise unknown("backbone", name, shown + ["... (any open_clip model name)"])
        raw = dict(raw)
    return BackboneConfig(
        name=name,
        embed_dim=int(raw["embed_dim"]),
        vision_cfg=dict(raw["vision_cfg"]),
        text_cfg=dict(raw["text_cfg"]),
        mean=tuple(raw.get("mean", OPENAI_MEAN)),
        std=tuple(raw.get("std", OPENAI_STD)),
    )


@dataclass
class Backbone:
    """An open_clip CLIP model with its config and tokenizer."""

    config: BackboneConfig
    clip: CLIP
    tokenizer: Any = field(repr=False)

    @property
    def visual(self) -> torch.nn.Module:
        return self.clip.visual

    def weights_hash(self) -> str:
        """Short sha256 of the vision tower's weights: the identity of θ_base."""
        return state_hash({f"visual.{k}": v for k, v in self.clip.visual.state_dict().items()})


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) over sorted names, shapes, dtypes and bytes of a state dict."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-dim too
    return digest.hexdigest()[:16]


def build_clip(config: BackboneConfig) -> CLIP:
    """Instantiate an open_clip ``CLIP`` with random weights from a config."""
    vision = {k: v for k, v in config.vision_cfg.items()}
    text = {k: v for k, v in config.text_cfg.items() if k not in ("hf_model_name", "hf_tokenizer_name")}
    if config.text_cfg.get("hf_model_name"):
        raise UnknownNameError(f"Backbone '{config.name}' uses a Hugging Face text tower; only open_clip text towers are supported")
    from open_clip.model import CLIP

    return CLIP(embed_dim=config.embed_dim, vision_cfg=vision, text_cfg=text)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a legacy torch file with ``weights_only=True``.

    Raises:
        ArtifactError: missing, corrupt or truncated file, or one that is not a plain state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ArtifactError(f"Corrupt or truncated safetensors checkpoint {path}: {err}") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad/unsafe files
        raise ArtifactError(f"Cannot read checkpoint {path} safely (weights_only=True): {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"Checkpoint {path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


@contextlib.contextmanager
def _offline():
    """Hugging Face hub in offline mode for the duration (env var and the already-imported constant)."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # no hub: open_clip can then only use its URL cache
        hf_constants = None
    old = getattr(hf_constants, "HF_HUB_OFFLINE", None)
    if hf_constants is not None:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def cached_pretrained_file(name: str, tag: str) -> Path:
    """The local file open_clip would load for ``name`` / ``tag``, without touching the network.

    open_clip's pretrained table gives a Hugging Face repo (cached under the hub cache,
    preferring a ``.safetensors`` alternative) or a URL (cached as ``~/.cache/clip/<file>``).

    Raises:
        UnknownNameError: ``tag`` is not a pretrained tag of ``name``.
        ArtifactError: the weights are not in the local cache (names the expected path).
    """
    from open_clip.pretrained import _get_safe_alternatives, get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        raise unknown(f"pretrained tag of '{name}'", tag, list_pretrained_tags_by_model(name) or ["(none)"])
    if cfg.get("file"):
        expected = [Path(cfg["file"])]
    elif cfg.get("hf_hub"):
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/model/' means the default file name
        filename = filename or "open_clip_pytorch_model.bin"
        expected = []
        for candidate in [*_get_safe_alternatives(filename), filename]:
            hit = try_to_load_from_cache(repo, candidate)
            if isinstance(hit, str):
                return Path(hit)
            expected.append(Path(hf_constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
                            / "<revision>" / candidate)
    else:
        expected = [Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))]
    for path in expected:
        if path.is_file():
            return path
    raise ArtifactError(f"open_clip weights '{name}' / '{tag}' are not in the local cache (expected {expected[0]}); "
                        "tvdiag never downloads: fetch them once with open_clip, or pass --checkpoint FILE")


def create_backbone(name: str, *, pretrained: str | None = None, checkpoint: str | Path | None = None,
                    seed: int = 0) -> Backbone:
    """Build a backbone by name with weights from a local checkpoint or an open_clip tag.

    Args:
        name: tvdiag config (``tiny``, ``micro``: :func:`local_configs`) or open_clip model name
            (``ViT-B-32``, ``ViT-L-14``).
        pretrained: open_clip pretrained tag (e.g. ``datacomp_xl_s13b_b90k``); it must already
            be in open_clip's cache, nothing is downloaded on tvdiag's behalf.
        checkpoint: path to a local state dict (safetensors or legacy torch file).
        seed: seed of the random initialisation when neither weights source is given.

    Raises:
        UnknownNameError: unknown backbone name.
        ArtifactError: unreadable checkpoint or one that does not match the architecture.
    """
    import open_clip

    config = load_config(name)
    torch.manual_seed(seed)
    if pretrained is not None and checkpoint is None:
        cached_pretrained_file(name, pretrained)  # fails fast, before any network access
        with _offline():
            try:
                clip = open_clip.create_model(name, pretrained=pretrained)
            except Exception as err:  # open_clip raises RuntimeError/FileNotFoundError/… for bad weights
                raise ArtifactError(
                    f"Cannot load open_clip weights '{name}' / '{pretrained}' from the local cache "
                    f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__}); pass "
                    f"--checkpoint /path/to/weights.safetensors; tvdiag never downloads weights."
                ) from err
    else:
        clip = build_clip(config)
        if checkpoint is not None:
            state = read_checkpoint(checkpoint)
            try:
                missing, unexpected = clip.load_state_dict(state, strict=False)
            except RuntimeError as err:
                first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)[:200]
                raise ArtifactError(f"Checkpoint {checkpoint} does not match backbone '{name}': {first}") from err
            if missing or unexpected:
                raise ArtifactError(
                    f"Checkpoint {checkpoint} does not match backbone '{name}': "
                    f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
                )
    clip.eval()
    tokenizer = open_clip.get_tokenizer(name) if name in open_clip.list_models() else open_clip.tokenizer.SimpleTokenizer(
        context_length=int(config.text_cfg.get("context_length", 77)))
    return Backbone(config=config, clip=clip, tokenizer=tokenizer)
