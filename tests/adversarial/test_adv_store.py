"""The store: a path choke point, no silent overwrite of artifacts tvdiag did not write,
no empty folders or stray temporaries after a failure, settings-keyed curvature."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import save_file

from tests._smoke import BACKBONE_ID
from tests.adversarial._helpers import common, refused, run, tree_hash
from train.errors import TvdiagError
from train.store import Store
from train.tensorio import read_metadata, save_tensors
from train.vectors import TaskVector

TRANSFER = ["transfer", "--source", "mnist", "--target", "animals"]


@pytest.mark.parametrize("call", [
    lambda s: s.head_path("../x"), lambda s: s.vector_path("/etc", "ft"), lambda s: s.vector_path("mnist", "../x"),
    lambda s: s.attribution_path("mnist", "../../x"), lambda s: s.curvature_dir(".."), lambda s: s.study_dir("a/b"),
    lambda s: s.curvature_path("mnist", "../card", {"k": 8}), lambda s: s.vector_path("mnist", "ftx", float("nan")),
])
def test_store_paths_refuse_unsafe_names(tmp_path, call):
    with pytest.raises(TvdiagError):
        call(Store(tmp_path, "tiny"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bid", ["../up", "a/b", "/abs", "..", ""])
def test_store_refuses_unsafe_backbone_id(tmp_path, bid):
    with pytest.raises(TvdiagError):
        Store(tmp_path, bid)


def test_store_refuses_a_path_that_resolves_outside_its_root(tmp_path):
    """A symlinked folder inside the store that points elsewhere is refused, whatever the caller."""
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Store(tmp_path / "root", "tiny")
    store.folder.mkdir(parents=True)
    (store.folder / "vectors").symlink_to(outside)
    with pytest.raises(TvdiagError, match="outside the store"):
        store.vector_path("mnist", "ft")


def _foreign_base(path):
    vec = TaskVector.load(path)
    prov = dict(vec.provenance, key="feedfacefeedface")  # a real vector from another store: its own key
    TaskVector(vec.tensors, "0123456789abcdef", prov).save(path)


def _no_metadata(path):
    tensors = TaskVector.load(path).tensors
    save_file(dict(tensors), str(path))


def _foreign_head(path):
    save_file({"head": torch.zeros(3, 3), "logit_scale": torch.tensor(1.0)}, str(path))


@pytest.mark.parametrize("relpath,damage,needle", [
    ("vectors/mnist/ft.safetensors", _foreign_base, "taken from base 0123456789abcdef"),
    ("vectors/mnist/ft.safetensors", _no_metadata, "not written by tvdiag"),
    ("vectors/animals/ftx-a0.8.safetensors", _no_metadata, "not written by tvdiag"),
    ("heads/animals.safetensors", _foreign_head, "not written by tvdiag"),
])
def test_foreign_artifact_is_never_overwritten(store_copy, capsys, relpath, damage, needle):
    """A vector of another base or without metadata used to be retrained over, exit 0."""
    path = store_copy / BACKBONE_ID / relpath
    damage(path)
    line = refused(capsys, [*TRANSFER, *common(store_copy)], needle, store_copy)
    assert "--rebuild" in line and str(path) in line


def test_rebuild_replaces_a_foreign_artifact_with_identical_bytes(smoke, store_copy, capsys):
    """`--rebuild mnist` rebuilds mnist's artifacts; same seed and threads give the same bytes (sha256)."""
    original = {p.name: p.read_bytes() for p in (smoke.folder / "vectors" / "mnist").glob("*.safetensors")}
    path = store_copy / BACKBONE_ID / "vectors" / "mnist" / "ft.safetensors"
    _no_metadata(path)
    code, out, err = run(capsys, ["zoo", "--domains", "mnist", "--rebuild", "mnist", *common(store_copy)])
    assert code == 0, err
    rebuilt = {p.name: p.read_bytes() for p in path.parent.glob("*.safetensors")}
    assert rebuilt == original
    assert read_metadata(path)["torch_threads"] == "1"


def test_failed_runs_leave_no_folders(tmp_path, capsys):
    root = tmp_path / "fresh"
    refused(capsys, ["transfer", "--source", "mnist", "--target", "nosuch", *common(root)], "Unknown domain", tmp_path)
    refused(capsys, [*TRANSFER, "--backbone", "vit-b-33", *common(root)], "Unknown backbone", tmp_path)
    assert not root.exists()


def test_stray_tmp_of_a_dead_writer_is_cleaned(store_copy, capsys):
    folder = store_copy / BACKBONE_ID / "vectors" / "mnist"
    dead = folder / ".ft.safetensors.4194305.abcd.tmp"  # above Linux's pid_max: never a live process
    live = folder / f".ft.safetensors.{os.getpid()}.efgh.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    code, _, err = run(capsys, ["zoo", "--domains", "mnist", *common(store_copy)])
    assert code == 0, err
    assert not dead.exists() and live.exists()


def test_curvature_is_keyed_by_its_settings(tmp_path):
    """A cheaper `risk --probes 4` must not replace the 24-probe card other commands rely on."""
    store = Store(tmp_path, "tiny")
    a = store.curvature_path("mnist", "card", {"probes": 24, "k": 8, "n_images": 256, "seed": 0})
    b = store.curvature_path("mnist", "card", {"seed": 0, "n_images": 256, "k": 8, "probes": 24})
    c = store.curvature_path("mnist", "card", {"probes": 4, "k": 8, "n_images": 256, "seed": 0})
    assert a == b != c and a.parent == c.parent == store.curvature_dir("mnist")
    assert a.name.startswith("card-") and a.suffix == ".safetensors"


def test_same_content_same_bytes(tmp_path):
    """Header in a fixed order and no wall-clock values in the content: two writes are byte-identical."""
    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64)}
    p1 = save_tensors(tmp_path / "x1.safetensors", t, {"key": "k", "z": 1, "seconds": 3.2})
    time.sleep(0.01)
    p2 = save_tensors(tmp_path / "x2.safetensors", dict(reversed(t.items())), {"seconds": 9.9, "z": 1, "key": "k"})
    assert p1.read_bytes() == p2.read_bytes()
    assert "seconds" not in read_metadata(p1)
    assert (tmp_path / "x1.timings.json").read_text().strip().endswith("}")
    assert read_metadata(p1)["torch_threads"] == str(torch.get_num_threads())


def test_tree_hash_sees_empty_folders(tmp_path):
    before = tree_hash(tmp_path)
    (tmp_path / "empty").mkdir()
    assert tree_hash(tmp_path) != before
