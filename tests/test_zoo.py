"""The zoo build: the controlled pair, seeds and variants, content addressing, resume, Grad-CAM."""

import shutil
from dataclasses import replace

import pytest
import torch

from tests._smoke import BACKBONE, BACKBONE_ID, one_thread, smoke_store
from train.datasets.augment import roll_patches
from train.errors import UnknownNameError
from train.explain.masking import patch_means
from train.loop import OptimConfig, batch_plan
from train.store import Store
from train.zoo import Zoo, preset


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # two threads on the shared 2-core box run several times slower
        yield


@pytest.fixture()
def copy_store(tmp_path):
    src = smoke_store()
    shutil.copytree(src.root, tmp_path / "store")
    return Store(tmp_path / "store", BACKBONE_ID)


def mtimes(store):
    return {p.relative_to(store.folder).as_posix(): p.stat().st_mtime_ns
            for p in store.folder.rglob("*.safetensors")}


def changed(before, after):
    return {k for k in after if after[k] != before.get(k)}


@pytest.mark.parametrize("shift", [0, 1])
def test_pair_with_alpha_one_reproduces_theta_ft_bit_for_bit(copy_store, shift):
    """θ_ft* code path at α = 1 (φ loaded, explain pass, same batches and patch rolls) = θ_ft."""
    zoo = Zoo(copy_store, replace(preset("smoke"), patch_shift=shift), progress=False)
    ft = zoo.train_ft("mnist")  # one thread (autouse fixture): the same kernels in both runs
    twin = zoo.train_ftx("mnist", 1.0)
    star = zoo.train_ftx("mnist", 0.8)
    assert ft.tensors.keys() == twin.tensors.keys()
    assert all(torch.equal(ft.tensors[k], twin.tensors[k]) for k in ft.tensors)
    assert not all(torch.equal(ft.tensors[k], star.tensors[k]) for k in ft.tensors)  # α matters


def test_phi_covers_every_training_image_plus_val_and_test(copy_store):
    zoo = Zoo(copy_store, preset("smoke"), progress=False)
    phi = zoo.attributions("mnist")
    cfg = zoo.config
    for split, n in (("train", cfg.max_train), ("val", cfg.max_val), ("test", cfg.shap_test)):
        assert phi[split].shape == (n, 16)
        assert torch.equal(phi[f"{split}_labels"], zoo.images("mnist", split, n)[1])
    meta = copy_store.load_vector("mnist", "ftx", 0.8).provenance
    assert int(meta["n_images"]) == cfg.max_train and meta["split"] == "train" and meta["init"] == "θ_base"
    assert "seconds" not in meta


def test_seeds_share_theta_base_and_are_keyed_in_the_store(copy_store):
    for seed_folder in (copy_store.folder / "vectors" / "mnist" / "s1", copy_store.folder / "attributions" / "s1"):
        shutil.rmtree(seed_folder, ignore_errors=True)  # another test may have built seed 1 in the shared store
    before = mtimes(copy_store)
    zoo = Zoo(copy_store, replace(preset("smoke"), seed=1), progress=False)
    zoo.build(["mnist"])
    new = changed(before, mtimes(copy_store))
    assert new == {"vectors/mnist/s1/ft.safetensors", "vectors/mnist/s1/ftx-a0.8.safetensors",
                   "attributions/s1/mnist-kernelshap.safetensors"}  # θ_base and the head reused
    s0, s1 = copy_store.load_vector("mnist", "ft"), copy_store.load_vector("mnist", "ft", seed=1)
    assert s1.provenance["seed"] == "1" and s1.provenance["base_seed"] == "0"
    assert not torch.equal(s0.tensors["visual.proj"], s1.tensors["visual.proj"])
    star = copy_store.explainability_vector("mnist", 0.8, seed=1)
    assert star.provenance["seed"] == "1"


def test_from_ft_variant_starts_at_theta_ft(copy_store):
    cfg = replace(preset("smoke"), from_ft=OptimConfig(steps=0, lr=3e-4, warmup=1, batch_size=32))
    zoo = Zoo(copy_store, cfg, progress=False)
    zoo.ftx("mnist", 0.8, variant="from-ft")
    path = copy_store.vector_path("mnist", "ftx", 0.8, variant="from-ft")
    assert path.name == "ftx-a0.8-fromft.safetensors"
    zoo.twin("mnist")
    for variant in ("from-ft", "from-ft-raw"):  # against the twin, and against θ_ft
        star = copy_store.explainability_vector("mnist", 0.8, variant=variant)
        assert all(float(t.abs().max()) == 0.0 for t in star.tensors.values())  # 0 steps: θ_ft* = θ_twin = θ_ft
    assert copy_store.load_vector("mnist", "ftx", 0.8, variant="from-ft").provenance["init"] == "θ_ft"
    with pytest.raises(UnknownNameError):
        copy_store.vector_path("mnist", "ftx", 0.8, variant="fromft")


def test_rebuild_reuses_everything(copy_store):
    before = mtimes(copy_store)
    Zoo(copy_store, preset("smoke"), progress=False).build(["mnist"])
    assert mtimes(copy_store) == before


def test_resume_rebuilds_only_the_missing_artifact(copy_store):
    before = mtimes(copy_store)
    copy_store.vector_path("mnist", "ftx", 0.8).unlink()
    Zoo(copy_store, preset("smoke"), progress=False).build(["mnist"])
    assert changed(before, mtimes(copy_store)) == {"vectors/mnist/ftx-a0.8.safetensors"}


def test_changed_settings_rebuild_only_downstream(copy_store):
    cfg = preset("smoke")
    Zoo(copy_store, cfg, progress=False).build(["mnist"], variants=("paper", "from-ft"))
    before = mtimes(copy_store)
    cfg = replace(cfg, from_ft=OptimConfig(steps=3, lr=1e-4, warmup=1, batch_size=16))
    Zoo(copy_store, cfg, progress=False).build(["mnist"], variants=("paper", "from-ft"))
    assert changed(before, mtimes(copy_store)) == {"vectors/mnist/ftx-a0.8-fromft.safetensors",
                                                   "vectors/mnist/ftx-a1-fromft.safetensors"}  # and its twin
    meta = copy_store.load_vector("mnist", "ftx", 0.8, variant="from-ft").provenance
    assert meta["steps"] == "3" and meta["lr"] == "0.0001" and meta["variant"] == "from-ft"
    before = mtimes(copy_store)
    Zoo(copy_store, replace(cfg, shap_samples=16), progress=False).build(["mnist"], variants=("paper", "from-ft"))
    assert changed(before, mtimes(copy_store)) == {"attributions/mnist-kernelshap.safetensors",
                                                   "vectors/mnist/ftx-a0.8.safetensors",
                                                   "vectors/mnist/ftx-a0.8-fromft.safetensors",
                                                   "vectors/mnist/ftx-a1-fromft.safetensors"}


def test_roll_patches_moves_phi_with_the_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 32, 32, generator=g)
    phi = patch_means(x.mean(1), 8).reshape(5, 16)  # φ = each patch's mean pixel
    shifts = torch.tensor([[0, 0], [1, 0], [0, -1], [-2, 3], [1, 1]])
    rx, rphi = roll_patches(x, phi, shifts, 8)
    assert torch.allclose(patch_means(rx.mean(1), 8).reshape(5, 16), rphi, atol=1e-6)
    for b, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(rx[b], torch.roll(x[b], (8 * dy, 8 * dx), dims=(1, 2)))
    assert roll_patches(x, None, shifts, 8)[1] is None


def test_batch_plan_is_one_stream_whatever_the_length():
    long, short = batch_plan(100, 16, 10, seed=3, max_shift=1), batch_plan(100, 16, 4, seed=3, max_shift=1)
    assert all(torch.equal(a.index, b.index) and torch.equal(a.shifts, b.shifts) for a, b in zip(long, short))
    assert not torch.equal(batch_plan(100, 16, 1, seed=4)[0].index, long[0].index)


def test_gradcam_supervision_shares_the_base(copy_store, tmp_path):
    store = Store(copy_store.root, f"{BACKBONE}-gradcam-test")
    store.folder.mkdir(parents=True)
    shutil.copy(copy_store.base_path(), store.base_path())
    base_mtime = store.base_path().stat().st_mtime_ns
    cfg = replace(preset("smoke"), supervision="gradcam")
    zoo = Zoo(store, cfg, progress=False)
    phi = zoo.attributions("animals")
    assert phi["train"].shape == (cfg.max_train, 16) and phi["test"].shape == (cfg.shap_test, 16)
    assert torch.isfinite(phi["train"]).all() and phi["train"].min() >= 0
    # stored under its own method name, never as Kernel SHAP
    assert store.attribution_path("animals", "gradcam").is_file()
    assert not store.attribution_path("animals", "kernelshap").exists()
    assert store.base_path().stat().st_mtime_ns == base_mtime  # the base was reused, not re-pretrained
    assert not (store.folder / "vectors" / "animals" / "ftx-a0.8.safetensors").exists()
