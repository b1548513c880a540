"""The zoo build: content addressing, resume after a kill, Grad-CAM supervision."""

import shutil
from dataclasses import replace

import pytest
import torch

from tests._smoke import BACKBONE_ID, smoke_store
from train.loop import OptimConfig
from train.store import Store
from train.zoo import Zoo, preset


@pytest.fixture()
def copy_store(tmp_path):
    src = smoke_store()
    shutil.copytree(src.root, tmp_path / "store")
    return Store(tmp_path / "store", BACKBONE_ID)


def mtimes(store):
    return {p.relative_to(store.folder).as_posix(): p.stat().st_mtime_ns
            for p in store.folder.rglob("*.safetensors")}


def test_rebuild_reuses_everything(copy_store):
    before = mtimes(copy_store)
    Zoo(copy_store, preset("smoke"), progress=False).build(["mnist"])
    assert mtimes(copy_store) == before


def test_resume_rebuilds_only_the_missing_artifact(copy_store):
    before = mtimes(copy_store)
    copy_store.vector_path("mnist", "ftx", 0.8).unlink()
    Zoo(copy_store, preset("smoke"), progress=False).build(["mnist"])
    after = mtimes(copy_store)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"vectors/mnist/ftx-a0.8.safetensors"}


def test_changed_settings_rebuild_only_downstream(copy_store):
    before = mtimes(copy_store)
    cfg = replace(preset("smoke"), ftx=OptimConfig(steps=3, lr=1e-3, warmup=1, batch_size=16))
    Zoo(copy_store, cfg, progress=False).build(["mnist"])
    after = mtimes(copy_store)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"vectors/mnist/ftx-a0.8.safetensors"}
    meta = copy_store.load_vector("mnist", "ftx", 0.8).provenance
    assert meta["steps"] == "3" and meta["alpha"] == "0.8" and meta["dataset_hash"]


def test_gradcam_supervision_shares_the_base(copy_store, tmp_path):
    store = Store(copy_store.root, "tiny-gradcam-test")
    store.folder.mkdir(parents=True)
    shutil.copy(copy_store.base_path(), store.base_path())
    base_mtime = store.base_path().stat().st_mtime_ns
    cfg = replace(preset("smoke"), supervision="gradcam")
    zoo = Zoo(store, cfg, progress=False)
    phi = zoo.attributions("animals")
    assert phi["train"].shape == (cfg.shap_train, 16) and phi["test"].shape == (cfg.shap_test, 16)
    assert torch.isfinite(phi["train"]).all() and phi["train"].min() >= 0
    assert store.base_path().stat().st_mtime_ns == base_mtime  # the base was reused, not re-pretrained
    assert not (store.folder / "vectors" / "animals" / "ftx-a0.8.safetensors").exists()
