"""Reading weights trained elsewhere: open_clip state dicts checked against the store's θ_base.

Supported inputs (:data:`SUPPORTED`): an open_clip state dict of a whole CLIP model (``visual.*``
keys, optionally under ``module.`` or ``state_dict``) or of the visual tower alone (its keys get
the ``visual.`` prefix), stored as ``.safetensors`` or as a torch file read with
``torch.load(weights_only=True)``. A pickled whole module (what task_vectors' ``torch.save(model)``
writes) is refused with the two-line conversion the user can run on a machine they trust.
Hugging Face CLIP checkpoints (``vision_model.*``) are refused: open_clip offers no converter.

An imported θ becomes a :class:`~train.vectors.TaskVector` τ = θ − θ_base with provenance
``{"imported_from", "sha256", "kind"}``. Before anything is written the architecture must
match (same names and shapes as θ_base) and θ must plausibly come from the store's base:
``--from-base FILE`` is checked by hash; without it, ‖θ − θ_base‖ / ‖θ_base‖ must stay below
:data:`MAX_RELATIVE_DISTANCE` (fine-tuning moves weights by a few per cent; another
initialisation or pretraining moves them by ~100 %).
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path
from typing import Mapping

import torch

from train.backbones import state_hash
from train.errors import ArtifactError, BaseMismatchError
from train.vectors import TaskVector

SUPPORTED = ("open_clip state dicts of a whole CLIP model (visual.* keys) or of the visual tower alone, as "
             ".safetensors or as .pt/.bin read with torch.load(weights_only=True)")
CONVERSION = ("import torch, safetensors.torch; m = torch.load(p, weights_only=False); "
              "safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out)")
#: Largest ‖θ − θ_base‖ / ‖θ_base‖ accepted as "fine-tuned from this base" without ``--from-base``.
MAX_RELATIVE_DISTANCE = 0.5
#: What ``diag import --kind`` accepts.
KINDS = ("base", "ft", "ftx", "star")


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)``; a pickled module is refused with the conversion to run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ArtifactError(f"{path} is a pickled module, which tvdiag never unpickles; on a machine you trust, "
                            f"with p={str(path)!r} and out='weights.safetensors', run: {CONVERSION}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ArtifactError(f"Cannot read {path} as a torch state dict (weights_only=True): "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip checkpoint, without ``module.`` / ``state_dict`` wrappers.

    Raises:
        ArtifactError: missing or unreadable file, a pickled module (the message shows
            :data:`CONVERSION`), not a dict of tensors, or a Hugging Face CLIP checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ArtifactError(f"Corrupt or truncated safetensors checkpoint {path}: {err}") from err
    else:
        state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path} is not a state dict of tensors; supported: {SUPPORTED}")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        raise ArtifactError(f"{path} is a Hugging Face CLIP checkpoint (vision_model.* keys); open_clip offers no "
                            f"converter for it, so tvdiag cannot map it. Supported: {SUPPORTED}")
    return state


def visual_part(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower as ``visual.*`` keys: a whole model's ``visual.*`` entries, or a tower's keys prefixed."""
    if any(k.startswith("visual.") for k in state):
        return {k: v for k, v in state.items() if k.startswith("visual.")}
    return {f"visual.{k}": v for k, v in state.items()}


def check_architecture(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Same parameter names and shapes as θ_base.

    Raises:
        BaseMismatchError: names differ (a few of each side are named) or a shape differs.
    """
    missing, extra = sorted(set(base) - set(state)), sorted(set(state) - set(base))
    if missing or extra:
        raise BaseMismatchError(f"{path} does not match the store's backbone: {len(missing)} parameters missing "
                                f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    for key, value in base.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise BaseMismatchError(f"{path} does not match the store's backbone: '{key}' has shape "
                                    f"{tuple(state[key].shape)}, the store's base has {tuple(value.shape)}")


def relative_distance(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """‖θ − θ_base‖ / ‖θ_base‖ over the floating-point tensors (float64 accumulation)."""
    num = den = 0.0
    for key, value in base.items():
        if not value.is_floating_point():
            continue
        b = value.double()
        num += float((state[key].double() - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.inf


def check_base(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], base_hash: str, path: str | Path,
               from_base: str | Path | None = None) -> None:
    """θ was fine-tuned from the store's θ_base: by the hash of ``from_base``, else by distance.

    Raises:
        BaseMismatchError: ``from_base`` hashes to another base, or θ is further than
            :data:`MAX_RELATIVE_DISTANCE` from θ_base (another initialisation or pretraining).
    """
    if from_base is not None:
        claimed = visual_part(read_state_dict(from_base))
        check_architecture(claimed, base, from_base)
        got = state_hash({k: v.float() for k, v in claimed.items()})
        if got != base_hash:
            raise BaseMismatchError(f"{path} was fine-tuned from base {got} ({from_base}), not the store's base "
                                    f"{base_hash}; import it into a store built on that base")
        return
    dist = relative_distance(state, base)
    if dist > MAX_RELATIVE_DISTANCE:
        raise BaseMismatchError(f"{path} is {dist:.0%} of ‖θ_base‖ away from the store's base {base_hash} (at most "
                                f"{MAX_RELATIVE_DISTANCE:.0%} for a model fine-tuned from it): another base; pass "
                                "--from-base FILE if it really was fine-tuned from this one")


def import_weights(path: str | Path, base: Mapping[str, torch.Tensor], base_hash: str, kind: str,
                   from_base: str | Path | None = None) -> TaskVector:
    """τ = θ − θ_base of an external checkpoint, checked, with import provenance.

    Args:
        path: the checkpoint (see :func:`read_state_dict`).
        base: θ_base as ``visual.*`` tensors; base_hash: its hash.
        kind: what θ is (``ft``, ``ftx``), or ``star`` when the file already holds an
            explainability vector τ* (stored as is, no subtraction).
        from_base: optional checkpoint of the base θ was fine-tuned from (checked by hash).

    Raises:
        ArtifactError, BaseMismatchError: see :func:`read_state_dict`, :func:`check_architecture`,
            :func:`check_base`; NaN/Inf values.
    """
    state = visual_part(read_state_dict(path))
    check_architecture(state, base, path)
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ArtifactError(f"{path}: tensor '{key}' contains NaN or Inf")
    provenance = {"imported_from": str(Path(path).resolve()), "sha256": file_sha256(path), "kind": kind}
    if kind == "star":
        return TaskVector({k: v.detach().float().contiguous() for k, v in state.items()}, base_hash, provenance)
    check_base(state, base, base_hash, path, from_base)
    return TaskVector.between(base, state, base_hash, provenance)


__all__ = ["SUPPORTED", "CONVERSION", "KINDS", "MAX_RELATIVE_DISTANCE", "file_sha256", "read_state_dict",
           "visual_part", "check_architecture", "relative_distance", "check_base", "import_weights"]
