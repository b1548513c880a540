"""The vendored mini-suite: 32x32 npz files checked against their sha256 in MANIFEST.json.

Each ``<name>.npz`` holds ``classnames`` and, per split ``s`` in ``train``, ``test`` and
optionally ``pool``, ``x_s`` (uint8 ``(N, H, W, C)``, ``C`` in {1, 3}) and ``y_s`` (integer
labels in ``[0, K)``). Arrays are read with ``allow_pickle=False``: an object array is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from train.datasets import templates as T
from train.datasets.domain import Domain, Split
from train.datasets.registry import ENV_VAR, PACKAGE_MINISUITE, SPLIT_ORDER
from train.datasets.splits import cap_and_resize
from train.errors import ArtifactError, DataError, unknown

_REVENDOR = (
    "re-vendor from a clean tvdiag checkout (data/minisuite/, e.g. `git checkout -- data/minisuite`)"
)


def manifest_dir(path: Path) -> Path | None:
    """``path`` or ``path/minisuite`` if it holds a MANIFEST.json, else None."""
    for p in (path, path / "minisuite"):
        if (p / "MANIFEST.json").is_file():
            return p
    return None


def minisuite_dir(data: str | Path | None = None) -> Path:
    """Directory of the mini-suite.

    Looked up in order: ``data`` if given, else ``$TVDIAG_DATA`` if set, else ``data/minisuite``
    next to the package (a source checkout), else ``./data/minisuite``. A directory counts if it
    (or its ``minisuite/`` subfolder) holds ``MANIFEST.json``.

    Raises:
        DataError: None of the candidates holds a MANIFEST.json.
    """
    if data is not None:
        candidates = [("data argument", Path(data).expanduser())]
    elif os.environ.get(ENV_VAR):
        candidates = [(f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser())]
    else:
        candidates = [("package", PACKAGE_MINISUITE), ("cwd", Path.cwd() / "data" / "minisuite")]
    for _, path in candidates:
        found = manifest_dir(path)
        if found is not None:
            return found
    tried = "; ".join(f"{src}: {p}" for src, p in candidates)
    raise DataError(
        f"mini-suite not found (no MANIFEST.json in {tried}). Set {ENV_VAR}=/path/to/minisuite "
        "or pass data=/path/to/minisuite"
    )


def read_manifest(root: Path) -> dict:
    """The parsed ``root/MANIFEST.json``; its ``domains`` maps a name to ``{"sha256": ...}``.

    Raises:
        ArtifactError: The file is unreadable or has no ``domains`` object.
    """
    path = root / "MANIFEST.json"
    try:
        manifest = json.loads(path.read_text())
        domains = manifest["domains"]
        if not isinstance(domains, dict):
            raise TypeError("'domains' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable mini-suite manifest ({e}); {_REVENDOR}") from e
    return manifest


def _read_npz(path: Path, expected: str) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of ``path`` and its sha256, which must equal ``expected``."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e}); {_REVENDOR}") from e
    got = hashlib.sha256(raw).hexdigest()
    if got != expected:
        raise ArtifactError(f"{path}: sha256 mismatch: expected {expected}, got {got}; {_REVENDOR}")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{path}: not a readable npz ({e}); {_REVENDOR}") from e
    if "classnames" not in arrays:
        raise ArtifactError(f"{path}: no 'classnames' array; {_REVENDOR}")
    return arrays, got


def _split_arrays(name: str, path: Path, arrays: dict[str, np.ndarray], s: str, k: int) -> Split | None:
    """Split ``s`` of the npz (None if absent), its shapes and labels in ``[0, k)`` checked."""
    if f"x_{s}" not in arrays and f"y_{s}" not in arrays:
        return None
    if f"x_{s}" not in arrays or f"y_{s}" not in arrays:
        raise ArtifactError(f"{path}: split '{s}' needs both x_{s} and y_{s}")
    x, y = arrays[f"x_{s}"], arrays[f"y_{s}"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{name}: x_{s} must be uint8 (N, H, W, C) with C in {{1, 3}}, got {x.dtype} {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.shape[0] != x.shape[0]:
        raise DataError(f"{name}: y_{s} must be {x.shape[0]} integer labels, got {y.dtype} {y.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{name}: split '{s}' is empty")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        bad = int(((y < 0) | (y >= k)).sum())
        raise DataError(f"{name}: split '{s}' has {bad} labels outside [0, {k}) (min {lo}, max {hi})")
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))


def load_minisuite(
    name: str, root: Path, image_size: int | None, max_per_split: int | None, seed: int
) -> Domain:
    """Load ``root/<name>.npz`` after checking its sha256 against ``root/MANIFEST.json``.

    Each split is capped and resized by :func:`~train.datasets.splits.cap_and_resize`; the
    domain's ``content_hash`` is the file's sha256.

    Raises:
        UnknownNameError: ``name`` is not in the manifest.
        ArtifactError: The file is missing, unreadable, fails its sha256 or is not an npz.
        DataError: Bad shapes or dtypes, an empty split, labels outside ``[0, K)``, no train/test.
    """
    domains = read_manifest(root)["domains"]
    entry = domains.get(name)
    if entry is None:
        raise unknown("mini-suite domain", name, domains)
    path = root / f"{name}.npz"
    arrays, sha = _read_npz(path, str(entry.get("sha256", "")))
    classnames = tuple(str(c) for c in arrays["classnames"].tolist())
    splits: dict[str, Split] = {}
    for s in SPLIT_ORDER:
        split = _split_arrays(name, path, arrays, s, len(classnames))
        if split is not None:
            splits[s] = cap_and_resize(split, max_per_split, image_size, seed, s)
    for s in ("train", "test"):
        if s not in splits:
            raise DataError(f"{name}: {path} has no '{s}' split (x_{s}, y_{s})")
    return Domain(
        name=name,
        classnames=classnames,
        templates=T.minisuite_templates(name),
        splits=splits,
        content_hash=sha,
        source="minisuite",
    )
