"""θ_base shipped with the repository (train/zoo/shipped.py): pinned, copied into a store, never trusted damaged,
and pretrained instead under ``--rebuild base``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from diag.cli import build_parser
from tests._smoke import one_thread, smoke_store
from train.errors import ArtifactError
from train.store import Store
from train.tensorio import data_sha256, load_tensors, read_metadata, save_tensors
from train.zoo import Zoo, shipped
from train.zoo.config import preset
from train.external_weights import file_sha256
from train.zoo.shipped import MANIFEST, read_manifest, shipped_base


def test_the_repository_ships_tiny_theta_base_pinned_and_intact():
    entry = read_manifest()["tiny-s0"]
    path = MANIFEST.parent / "tiny-s0.safetensors"
    assert file_sha256(path) == entry["sha256"]
    meta = read_metadata(path)
    assert data_sha256(path) == meta["tensors_sha256"] == entry["tensors_sha256"]
    assert (meta["key"], meta["base_hash"], meta["torch_threads"]) == (entry["key"], entry["base_hash"],
                                                                       str(entry["torch_threads"]))


def test_an_empty_tiny_store_copies_the_shipped_base_byte_for_byte(tmp_path):
    """The default preset's key is the manifest's: the store gets the shipped file itself, not a new pretraining."""
    store = Store(tmp_path, "tiny")
    backbone, base_hash = Zoo(store, preset("default"), progress=False).base()
    entry = read_manifest()["tiny-s0"]
    assert base_hash == entry["base_hash"] == backbone.weights_hash()
    assert file_sha256(store.base_path()) == entry["sha256"]


def _pinned(folder: Path, source: Path, name: str = "test-base") -> Path:
    """A manifest in ``folder`` that ships ``source`` (marked, so a copy is told apart from a pretraining)."""
    tensors, meta = load_tensors(source)
    save_tensors(folder / f"{name}.safetensors", tensors, {**meta, "shipped_by": "test"})
    path = folder / f"{name}.safetensors"
    entry = {"key": meta["key"], "sha256": file_sha256(path), "base_hash": meta["base_hash"]}
    (folder / "MANIFEST.json").write_text(json.dumps({"files": {name: entry}}))
    return folder / "MANIFEST.json"


def test_copy_when_pinned_pretrain_under_rebuild_base_refuse_when_damaged(tmp_path, monkeypatch):
    config = preset("smoke")
    built = smoke_store()  # the shared smoke store's θ_base (micro), pretrained once per test process
    (tmp_path / "ship").mkdir()
    manifest = _pinned(tmp_path / "ship", built.base_path())
    monkeypatch.setattr(shipped, "MANIFEST", manifest)

    copied = Store(tmp_path / "b", config.backbone_id)
    Zoo(copied, config, progress=False).base()
    assert read_metadata(copied.base_path())["shipped_by"] == "test"
    assert file_sha256(copied.base_path()) == file_sha256(manifest.parent / "test-base.safetensors")

    rebuilt = Store(tmp_path / "b", config.backbone_id, rebuild=frozenset({"base"}), rebuild_before=time.time() + 1)
    with one_thread():  # the thread count the smoke store was pretrained at
        _, base_hash = Zoo(rebuilt, config, progress=False).base()
    assert "shipped_by" not in read_metadata(rebuilt.base_path())  # pretrained again, over the copy
    assert base_hash == read_metadata(built.base_path())["base_hash"]  # same threads, same weights

    damaged = manifest.parent / "test-base.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="--rebuild base"):
        Zoo(Store(tmp_path / "c", config.backbone_id), config, progress=False).base()
    assert not (tmp_path / "c").exists() or not Store(tmp_path / "c", config.backbone_id).base_path().exists()
    damaged.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        shipped_base(json.loads(manifest.read_text())["files"]["test-base"]["key"], manifest)


def test_an_unpinned_key_ships_nothing(tmp_path):
    shutil.copy(MANIFEST, tmp_path / "MANIFEST.json")
    assert shipped_base("0000000000000000", tmp_path / "MANIFEST.json") is None
    (tmp_path / "MANIFEST.json").write_text("[]")
    with pytest.raises(ArtifactError, match="not a θ_base manifest"):
        read_manifest(tmp_path / "MANIFEST.json")


def test_rebuild_base_is_a_cli_choice(tmp_path):
    args = build_parser().parse_args(["zoo", "--rebuild", "base", "--store", str(tmp_path)])
    assert args.rebuild == ["base"]
    store = Store(tmp_path, "tiny", rebuild=frozenset(args.rebuild), rebuild_before=time.time() + 1)
    store.folder.mkdir(parents=True)
    store.base_path().write_bytes(b"x")
    assert store.rebuilds(store.base_path())
