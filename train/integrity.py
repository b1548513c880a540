"""Checking a whole store's tensor files against the checksums recorded when they were written.

Every tensor file tvdiag writes records ``tensors_sha256`` (:mod:`train.tensorio`); every
load verifies it. :func:`check_tensor_files` does the same for every ``*.safetensors`` under a
folder at once, so a user can audit a store (or a folder of published vectors) before
trusting any answer computed from it: ``diag verify``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.errors import ArtifactError
from train.tensorio import CHECKSUM_KEY, read_metadata, verify_checksum

#: Outcomes of one file's check, from good to bad.
STATUSES = ("ok", "unchecked", "damaged")


@dataclass(frozen=True)
class FileCheck:
    """One file's verdict: ``ok`` (bytes match the checksum), ``unchecked`` (no checksum
    recorded: written by an older tvdiag or another tool) or ``damaged`` (unreadable, or
    bytes that differ from the checksum; ``detail`` says which)."""

    path: Path
    status: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"path": str(self.path), "status": self.status, "detail": self.detail}


def check_tensor_file(path: str | Path) -> FileCheck:
    """Verify one safetensors file (header, then the data section against its checksum)."""
    path = Path(path)
    try:
        meta = read_metadata(path)
        if CHECKSUM_KEY not in meta:
            return FileCheck(path, "unchecked", "no checksum recorded (written by an older tvdiag or another tool)")
        verify_checksum(path, meta)
    except ArtifactError as err:
        return FileCheck(path, "damaged", str(err))
    except OSError as err:
        return FileCheck(path, "damaged", f"cannot be read: {err.strerror or err}")
    return FileCheck(path, "ok")


def tensor_files(root: str | Path) -> list[Path]:
    """Every ``*.safetensors`` regular file under ``root`` (sorted; temporaries and links skipped)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*.safetensors")
                  if not p.name.startswith(".") and p.is_file() and not p.is_symlink())


def check_tensor_files(root: str | Path, progress=None) -> list[FileCheck]:
    """:func:`check_tensor_file` of every file of :func:`tensor_files`; ``progress`` wraps the list."""
    files = tensor_files(root)
    return [check_tensor_file(p) for p in (progress(files) if progress else files)]
