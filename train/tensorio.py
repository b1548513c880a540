"""Safetensors I/O with atomic, byte-reproducible writes, provenance metadata and refusal of unsafe files.

Every tensor file of tvdiag goes through :func:`save_tensors` / :func:`load_tensors`.
Writes go to a temporary file ``.<name>.<pid>.<random>.tmp`` in the destination folder and
are renamed over the target (``os.replace``), so a killed process never leaves a
half-written artifact behind; :func:`sweep_stale_tmp` removes temporaries whose writer died.

Same inputs, same bytes: the file is encoded here (not by ``safetensors.save_file``, whose
header order varies) with tensors in sorted name order and a JSON header with sorted keys.
Wall-clock timings are kept out of the content and written to a side file
``<stem>.timings.json``; the torch thread count is part of the provenance.

Integrity: every file records ``tensors_sha256``, the sha256 of its data section (the bytes
after the JSON header, i.e. every tensor's bytes in file order), and :func:`load_tensors`
verifies it, so a flipped bit in a stored tensor is refused instead of changing an answer.
By hand: ``tail -c +$((9 + n)) FILE | sha256sum`` with ``n`` the header length (the file's
first 8 bytes, little-endian).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

import torch
from safetensors import SafetensorError, safe_open

from train import __version__
from train.errors import ArtifactError, StoreError, UncheckedArtifactWarning

_PICKLE_MAGIC = (b"\x80",)           # pickle protocol 2+ opcode PROTO
_ZIP_MAGIC = b"PK\x03\x04"           # torch.save's zip container (holds a pickle)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_TMP_PID = re.compile(r"^\..+\.(\d+)\.[^.]*\.tmp$")
_STALE_AFTER_S = 24 * 3600           # a .tmp without a parseable writer pid is stale after a day
#: metadata key of the data section's sha256 (set by :func:`save_tensors`, checked by :func:`load_tensors`)
CHECKSUM_KEY = "tensors_sha256"
_CHUNK = 1 << 22


def is_timing_key(key: str) -> bool:
    """Metadata keys that hold wall-clock values (kept out of the file's content)."""
    return key == "seconds" or key.endswith("_seconds") or key in ("created_utc", "wall_s")


def check_writable(folder: Path, what: str = "Store folder") -> None:
    """Raise :class:`StoreError` unless ``folder`` exists writable or could be created; creates nothing.

    The nearest existing ancestor must be a writable folder: checking without creating
    means a run that fails later leaves no empty folders behind.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: creating through it writes elsewhere
            raise StoreError(f"{what} {folder} cannot be created: {probe} is a dangling link")
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{what} {folder} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StoreError(f"{what} {folder} is not writable ({probe} is read-only)")


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sweep_stale_tmp(folder: Path, recursive: bool = False) -> list[Path]:
    """Delete ``.*.tmp`` files under ``folder`` whose writer process is gone; returns them.

    A temporary's name carries its writer's pid; one without a pid is removed once it is a
    day old. Live writers (another process building the same store) are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")):
        match = _TMP_PID.match(path.name)
        try:
            stale = (not _writer_alive(int(match.group(1)))) if match else \
                time.time() - path.stat().st_mtime > _STALE_AFTER_S
            if stale and path.is_file():
                path.unlink()
                removed.append(path)
        except OSError:  # vanished or not ours to delete: leave it
            continue
    return removed


def _write_safetensors(fh: BinaryIO, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """safetensors encoding with sorted tensor names and sorted header keys (byte-reproducible)."""
    header: dict = {}
    payload = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"'{name}' is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"'{name}' has dtype {tensor.dtype}, which safetensors cannot store here")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        payload.append(tensor)
        offset += nbytes
    digest = hashlib.sha256()
    for tensor in payload:
        if tensor.numel():
            digest.update(_bytes_of(tensor))
    header["__metadata__"] = dict(sorted({**meta, CHECKSUM_KEY: digest.hexdigest()}.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    fh.write(len(text).to_bytes(8, "little"))
    fh.write(text)
    for tensor in payload:
        if tensor.numel():
            fh.write(_bytes_of(tensor))


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def atomic_write(path: Path, write) -> None:
    """Run ``write(fh)`` into a temporary beside ``path``, fsync it and rename it over ``path``.

    The one atomic writer of tvdiag (tensors, probe checkpoints, study tables, rankings): the
    temporary is ``.<name>.<pid>.<random>.tmp``, the name :func:`sweep_stale_tmp` parses, so a
    killed writer's leftover is recognised and removed. A failed write leaves ``path`` as it was.

    Raises:
        StoreError: the folder cannot be written (``path`` unchanged, no temporary left).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise StoreError(f"Cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"Cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(Path(path), lambda fh: fh.write(data))


def merge_json_side(path: Path, entries: Mapping[str, object]) -> None:
    """Add ``entries`` to the JSON object in ``path`` (a side file: timings, provenance), atomically.

    Entries of the same key are replaced. A missing or unreadable side file is started afresh:
    side files are informative only, the artifact's own checksum guards its numbers.
    """
    path = Path(path)
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    atomic_write_bytes(path, json.dumps({**known, **entries}, sort_keys=True, indent=1).encode())


def timings_path(path: Path) -> Path:
    """The side file of an artifact's wall-clock timings: ``<stem>.timings.json``."""
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.timings.json")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` with string ``metadata`` (plus version and thread count) to ``path``.

    Timing keys (:func:`is_timing_key`) go to :func:`timings_path` instead, so two builds
    from the same inputs on the same thread count give identical files.
    """
    path = Path(path)
    check_writable(path.parent)
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    timings = {k: meta.pop(k) for k in [k for k in meta if is_timing_key(k)]}
    meta.setdefault("tvdiag_version", __version__)
    meta.setdefault("torch_threads", str(torch.get_num_threads()))
    for name, value in tensors.items():  # fail before anything touches the disk
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"'{name}' is a {type(value).__name__}, not a tensor")
        if value.dtype not in _DTYPES:
            raise TypeError(f"'{name}' has dtype {value.dtype}, which tvdiag does not store")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"Store folder {path.parent} cannot be created: {err.strerror or err}") from err
    sweep_stale_tmp(path.parent)
    atomic_write(path, lambda fh: _write_safetensors(fh, tensors, meta))
    if timings:
        text = json.dumps(timings, sort_keys=True, indent=1).encode()
        atomic_write(timings_path(path), lambda fh: fh.write(text))
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


def data_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's data section (every byte after the JSON header)."""
    with Path(path).open("rb") as fh:
        fh.seek(8 + int.from_bytes(fh.read(8), "little"))
        digest = hashlib.sha256()
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: str | Path, meta: Mapping[str, str]) -> bool:
    """Check the data section of ``path`` against its recorded ``tensors_sha256``.

    Returns True when verified, False for a file without a checksum (written by a tvdiag
    before checksums, or by another tool).

    Raises:
        ArtifactError: the bytes differ from the checksum recorded when the file was written.
    """
    recorded = meta.get(CHECKSUM_KEY)
    if recorded is None:
        return False
    actual = data_sha256(path)
    if actual != recorded:
        raise ArtifactError(f"{path} is damaged: its tensor bytes have sha256 {actual[:12]}…, not the "
                            f"{recorded[:12]}… recorded when it was written; pass --rebuild with its domain "
                            "(or delete it) to replace it")
    return True


def _read(path: str | Path, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Open a safetensors file after the existence and pickle checks; read metadata (and tensors).

    With ``tensors`` the data section is verified against the recorded checksum first.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Missing artifact: {path}")
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            if tensors and not verify_checksum(path, meta) and "tvdiag_version" in meta:
                warnings.warn(f"{path} was written without a checksum (an older tvdiag): its bytes cannot be "
                              "verified; `diag verify` lists such files", UncheckedArtifactWarning, stacklevel=3)
            values = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    except ArtifactError:
        raise
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


# ------------------------------------------------------------------ a whole folder's check (diag verify)


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
