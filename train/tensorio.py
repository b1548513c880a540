"""Safetensors I/O with atomic writes, provenance metadata and refusal of unsafe files.

Every tensor file of tvdiag goes through :func:`save_tensors` / :func:`load_tensors`.
Writes go to a temporary file in the destination folder and are renamed over the target
(``os.replace``), so a killed process never leaves a half-written artifact behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from train import __version__
from train.errors import ArtifactError, StoreError

_PICKLE_MAGIC = (b"\x80",)           # pickle protocol 2+ opcode PROTO
_ZIP_MAGIC = b"PK\x03\x04"           # torch.save's zip container (holds a pickle)


def check_writable(folder: Path) -> None:
    """Raise :class:`StoreError` unless ``folder`` can be created and written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"Store folder {folder} cannot be created: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"Store folder {folder} is not writable")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` with string ``metadata`` (plus the package version) to ``path``."""
    path = Path(path)
    check_writable(path.parent)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("tvdiag_version", __version__)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(payload, tmp, metadata=meta)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"Cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _sniff(path: Path) -> None:
    """Tell pickles and torch zip files apart from safetensors before parsing.

    A safetensors file starts with a little-endian u64 header length n followed by a JSON
    header starting with ``{``; anything else is refused without being interpreted.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) == 9:
        n = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 8 + n <= size:
            return
    if head.startswith(_ZIP_MAGIC) or (head[:1] in _PICKLE_MAGIC and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise ArtifactError(f"{path} is a pickle/torch file, not safetensors; tvdiag never unpickles artifacts")
    if len(head) < 9 or (head[8:9] == b"{"):
        raise ArtifactError(f"Corrupt or truncated safetensors file {path} ({size} bytes)")
    raise ArtifactError(f"{path} is not a safetensors file")


def _read(path: str | Path, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Open a safetensors file after the existence and pickle checks; read metadata (and tensors)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Missing artifact: {path}")
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            values = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"Corrupt or truncated safetensors file {path}: {err}") from err
    return values, meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a safetensors file without reading its tensors."""
    return _read(path, tensors=False)[1]


def load_tensors(path: str | Path, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the metadata of a safetensors file.

    Raises:
        ArtifactError: missing, pickled, truncated or corrupt file; NaN/Inf when ``check_finite``.
    """
    tensors, meta = _read(path, tensors=True)
    if check_finite:
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ArtifactError(f"{path}: tensor '{key}' contains NaN or Inf")
    return tensors, meta


def dumps(obj) -> str:
    """Canonical JSON for metadata values and content keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
