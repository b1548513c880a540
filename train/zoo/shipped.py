"""θ_base shipped with the repository: ``data/base/<name>.safetensors``, pinned in ``data/base/MANIFEST.json``.

A backbone without weights (``tiny``) starts from θ_base pretrained on the mini-suite's pool
splits: minutes of CPU, and bits that depend on the thread count (the same seed at 1 and at 2
threads gives two different θ_base). The repository ships the one θ_base its committed
results were built from, the way a user of ViT-B/32 starts from the published CLIP weights.
A store without θ_base copies the shipped file when the file's content key (backbone,
pretraining settings, data hashes, seed: :meth:`train.zoo.build.Zoo._base_key`) is the one
the store asks for, after checking the file against its pinned sha256. Any other key
pretrains as before; so does ``diag zoo --rebuild base`` (or ``--rebuild all``), and
``scripts/check_base.py`` checks that pretraining at the recorded thread count reproduces
the shipped file's weights byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from train.errors import ArtifactError
from train.external_weights import file_sha256
from train.tensorio import atomic_write, read_metadata

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "base"
MANIFEST = SHIPPED_DIR / "MANIFEST.json"


def read_manifest(manifest: Path | None = None) -> dict[str, dict]:
    """The manifest's entries by name ({} when the repository ships none); default :data:`MANIFEST`."""
    manifest = manifest or MANIFEST
    if not manifest.is_file():
        return {}
    try:
        return dict(json.loads(manifest.read_text())["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{manifest} is not a θ_base manifest ({err}): restore it with "
                            "'git checkout -- data/base'") from None


def shipped_base(key: str, manifest: Path | None = None) -> Path | None:
    """The shipped θ_base whose content key is ``key``, checked against its pinned sha256; None when none ships.

    Raises:
        ArtifactError: the pinned file is missing or its bytes are not the pinned ones (a damaged
            checkout: restore it, or pass ``--rebuild base`` to pretrain instead).
    """
    manifest = manifest or MANIFEST
    for name, entry in read_manifest(manifest).items():
        if entry.get("key") != key:
            continue
        path = manifest.parent / f"{name}.safetensors"
        how = "restore it with 'git checkout -- data/base', or pass --rebuild base to pretrain θ_base instead"
        if not path.is_file():
            raise ArtifactError(f"{path} is pinned in {manifest} but missing: {how}")
        if file_sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{path} does not match the sha256 pinned in {manifest}: {how}")
        return path
    return None


def copy_shipped(source: Path, dest: Path) -> None:
    """Copy a shipped θ_base into a store, atomically (a killed copy leaves no half file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src:
        atomic_write(dest, lambda fh: shutil.copyfileobj(src, fh, 1 << 20))


def refuse_other_base_seed(store, path: Path, base_seed: int) -> None:
    """Refuse to replace a store's θ_base of another base seed (the full-seed axis keeps one store per seed): a
    command run without that store's ``$TVDIAG_BASE_SEED`` would otherwise rebuild θ_base and every vector on it.
    ``--rebuild base`` (or ``all``) still replaces it.

    Raises:
        ArtifactError: ``path`` holds θ_base of a base seed other than ``base_seed``.
    """
    if not path.is_file() or store.rebuilds(path):
        return
    seed = read_metadata(path).get("seed", "")
    if seed.isdigit() and int(seed) != base_seed:
        raise ArtifactError(f"{store.root}'s θ_base was built with base seed {seed}, this run asks for {base_seed}: "
                            f"set TVDIAG_BASE_SEED={seed} for this store (and its TVDIAG_SPLIT_SEED), use another "
                            "store, or pass --rebuild base to replace it")
