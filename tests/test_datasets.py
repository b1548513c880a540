"""Dataset registry: real mini-suite data, sha256 checks, local copies and ImageFolders."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.datasets import templates as T
from train.datasets import (
    MINISUITE,
    PACKAGE_MINISUITE,
    PAPER_DATASETS,
    DataWarning,
    Domain,
    Split,
    available_domains,
    dataset_info,
    load_domain,
    minisuite_dir,
)
from train.errors import ArtifactError, DataError, UnknownNameError

MANIFEST = json.loads((PACKAGE_MINISUITE / "MANIFEST.json").read_text())


# ---------------------------------------------------------------------------- mini-suite


@pytest.mark.parametrize("name", MINISUITE)
def test_minisuite_domain_matches_manifest(name):
    entry = MANIFEST["domains"][name]
    d = load_domain(name)
    assert isinstance(d, Domain) and d.name == name and d.source == "minisuite"
    assert d.content_hash == entry["sha256"]
    assert d.content_hash == hashlib.sha256((PACKAGE_MINISUITE / f"{name}.npz").read_bytes()).hexdigest()
    assert list(d.classnames) == entry["classnames"] == list(dataset_info(name).classnames)
    assert d.num_classes == entry["num_classes"]
    assert list(d.splits) == ["train", "test", "pool", "val"]
    for s, n in entry["splits"].items():
        sp = d.split(s)
        if s == "train":  # the validation split is carved from the file's train split
            val = d.split("val")
            sp = Split(torch.cat([sp.images, val.images]), torch.cat([sp.labels, val.labels]))
        assert sp.images.shape == (n, 32, 32, entry["channels"])
        assert sp.images.dtype == torch.uint8 and sp.labels.dtype == torch.int64
        counts = sp.class_counts(d.num_classes)
        assert counts.sum() == n and counts.min() >= 1
        assert counts.max() - counts.min() <= 1  # class-balanced, per the README
    assert 3 <= len(d.templates) <= 8 and all("{c}" in t for t in d.templates)


def test_minisuite_templates_are_domain_specific():
    assert T.minisuite_templates("mnist")[0] == 'a photo of the number: "{c}".'
    assert T.minisuite_templates("fashion")[0] == "a photo of a {c}, a type of clothing."
    assert T.minisuite_templates("gtsrb")[0] == 'a zoomed in photo of a "{c}" traffic sign.'
    assert T.minisuite_templates("dtd")[0] == "a photo of a {c} texture."
    assert "silhouette" in T.minisuite_templates("animals")[0]


def test_minisuite_cap_is_stratified_seeded_and_resize():
    d = load_domain("mnist", max_per_split=50, image_size=48, seed=3)
    for s in ("train", "test", "pool"):
        sp = d.split(s)
        if s == "train":  # capped first, then the validation split is carved from it
            val = d.split("val")
            assert len(val) == 8  # round(0.15 * 50)
            sp = Split(torch.cat([sp.images, val.images]), torch.cat([sp.labels, val.labels]))
        assert sp.images.shape == (50, 48, 48, 1)
        assert sp.class_counts(10).tolist() == [5] * 10
    again = load_domain("mnist", max_per_split=50, image_size=48, seed=3)
    other = load_domain("mnist", max_per_split=50, image_size=48, seed=4)
    assert torch.equal(d.split("train").images, again.split("train").images)
    assert not torch.equal(d.split("train").labels, other.split("train").labels)
    # the capped images are images of the full split (resize aside)
    full = load_domain("mnist", max_per_split=50, seed=3).split("train")
    assert full.images.shape == (42, 32, 32, 1)


def _copy_suite(tmp_path: Path, names=("mnist",)) -> Path:
    dst = tmp_path / "minisuite"
    dst.mkdir()
    for n in names:
        shutil.copy(PACKAGE_MINISUITE / f"{n}.npz", dst / f"{n}.npz")
    shutil.copy(PACKAGE_MINISUITE / "MANIFEST.json", dst / "MANIFEST.json")
    return dst


def test_sha_mismatch_on_corrupted_copy(tmp_path):
    suite = _copy_suite(tmp_path)
    f = suite / "mnist.npz"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    expected = MANIFEST["domains"]["mnist"]["sha256"]
    got = hashlib.sha256(bytes(raw)).hexdigest()
    with pytest.raises(ArtifactError) as e:
        load_domain("mnist", data=suite)
    msg = str(e.value)
    assert f"sha256 mismatch: expected {expected}, got {got}; re-vendor from" in msg
    # a truncated file fails the same check
    f.write_bytes(bytes(raw[:1000]))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_domain("mnist", data=suite)
    f.unlink()
    with pytest.raises(ArtifactError, match="cannot read"):
        load_domain("mnist", data=suite)


def test_env_var_and_argument_override(tmp_path, monkeypatch):
    suite = _copy_suite(tmp_path)
    assert minisuite_dir(suite) == suite
    assert minisuite_dir(tmp_path) == suite  # a folder holding minisuite/ also works
    monkeypatch.setenv("TVDIAG_DATA", str(suite))
    assert minisuite_dir() == suite
    assert load_domain("mnist").content_hash == MANIFEST["domains"]["mnist"]["sha256"]
    (suite / "mnist.npz").write_bytes(b"not an npz")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_domain("mnist")  # proves the env var is honoured
    monkeypatch.setenv("TVDIAG_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="mini-suite not found.*TVDIAG_DATA"):
        load_domain("mnist")


def _write_suite(tmp_path: Path, name: str, arrays: dict) -> Path:
    suite = tmp_path / "bad"
    suite.mkdir(exist_ok=True)
    path = suite / f"{name}.npz"
    np.savez(path, **arrays)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (suite / "MANIFEST.json").write_text(json.dumps({"domains": {name: {"sha256": sha}}}))
    return suite


def _tiny_arrays(y_test):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    return {
        "x_train": x, "y_train": np.array([0, 1, 2, 0], np.int16),
        "x_test": x[: len(y_test)], "y_test": np.array(y_test, np.int16),
        "classnames": np.array(["a", "b", "c"]),
    }  # fmt: skip


def test_label_range_and_empty_split(tmp_path):
    suite = _write_suite(tmp_path, "mnist", _tiny_arrays([0, 3, 1]))
    with pytest.raises(DataError, match=r"split 'test' has 1 labels outside \[0, 3\) \(min 0, max 3\)"):
        load_domain("mnist", data=suite)
    suite = _write_suite(tmp_path, "mnist", _tiny_arrays([-1, 0]))
    with pytest.raises(DataError, match=r"outside \[0, 3\)"):
        load_domain("mnist", data=suite)
    suite = _write_suite(tmp_path, "mnist", _tiny_arrays([]))
    with pytest.raises(DataError, match="split 'test' is empty"):
        load_domain("mnist", data=suite)
    # a valid tiny file under a name that only its manifest knows loads, with generic templates
    suite = _write_suite(tmp_path, "tiny", _tiny_arrays([2, 1]))
    d = load_domain("tiny", data=suite, val_fraction=0)  # 4 train images: too few to carve val
    assert d.classnames == ("a", "b", "c") and len(d.split("test")) == 2
    assert d.templates == T.GENERIC_TEMPLATES
    assert "pool" not in d.splits
    with pytest.raises(DataError, match="no split 'pool'. Available: train, test"):
        d.split("pool")


def test_npz_with_pickled_arrays_is_refused(tmp_path):
    arrays = _tiny_arrays([0, 1])
    arrays["classnames"] = np.array(["a", "b", "c"], dtype=object)  # needs pickle to read
    suite = _write_suite(tmp_path, "mnist", arrays)
    with pytest.raises(ArtifactError, match="not a readable npz"):
        load_domain("mnist", data=suite)


# ---------------------------------------------------------------------------- names


def test_unknown_name_lists_available():
    with pytest.raises(UnknownNameError) as e:
        load_domain("eurosatt")
    msg = str(e.value)
    assert msg.startswith("Unknown domain 'eurosatt'. Available: ")
    for n in (*MINISUITE, *PAPER_DATASETS, "imagefolder"):
        assert n in msg
    with pytest.raises(UnknownNameError, match="Unknown domain 'nope'"):
        dataset_info("nope")
    assert set(available_domains()) == set(MINISUITE) | set(PAPER_DATASETS)
    assert dataset_info("imagefolder").templates == T.GENERIC_TEMPLATES


def test_names_are_normalised():
    assert load_domain("MNIST", max_per_split=10).name == "mnist"
    assert dataset_info("EuroSAT").name == "eurosat"
    assert dataset_info("CIFAR-100").name == "cifar100"
    assert dataset_info("Stanford_Cars").name == "cars"
    assert dataset_info("fashion-mnist").name == "fashion"


def test_missing_local_copy_says_what_and_where(tmp_path):
    with pytest.raises(DataError) as e:
        load_domain("eurosat")
    assert str(e.value) == (
        "eurosat: no local copy. Pass --data /path/to/EuroSAT with one folder per class "
        "(AnnualCrop, Forest, ...) or train/ and test/ subfolders; nothing is downloaded."
    )
    for n in PAPER_DATASETS:
        if n in MINISUITE:
            continue
        with pytest.raises(DataError, match=rf"^{n}: no local copy\. Pass --data /path/to/"):
            load_domain(n)
    with pytest.raises(DataError, match=r"^svhn: data path .*nowhere does not exist\. Pass --data /path/to/SVHN"):
        load_domain("svhn", data=tmp_path / "nowhere")


# ---------------------------------------------------------------------------- paper registry

TEMPLATE_COUNTS = {"cars": 8, "dtd": 8, "eurosat": 3, "gtsrb": 3, "mnist": 1, "resisc45": 18, "sun397": 2, "svhn": 1}
CLASS_COUNTS = {
    "cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45,
    "sun397": 397, "svhn": 10, "cifar100": 100, "stl10": 10, "imagenet": 1000,
}  # fmt: skip


@pytest.mark.parametrize("name", PAPER_DATASETS)
def test_paper_registry(name):
    info = dataset_info(name, paper=True)
    assert info.num_classes == CLASS_COUNTS[name]
    # open_clip's cleaned ImageNet names repeat two: "missile" and "sunglasses"
    assert len(set(info.classnames)) == info.num_classes - (2 if name == "imagenet" else 0)
    if name in TEMPLATE_COUNTS:
        assert len(info.templates) == TEMPLATE_COUNTS[name]
    for t in info.templates:
        assert t.count("{c}") == 1 and t.format(c="X").count("X") >= 1
    assert "/path/to/" in info.expected_layout


def test_paper_registry_facts():
    assert "AM General Hummer SUV 2000" in dataset_info("cars").classnames
    assert dataset_info("sun397").classnames[:2] == ("abbey", "airplane cabin")
    assert dataset_info("imagenet").classnames[0] == "tench"
    assert dataset_info("imagenet").templates[0] == "a bad photo of a {c}."
    assert dataset_info("mnist").classnames[0] == "zero"  # the mini-suite entry ...
    assert dataset_info("mnist", paper=True).classnames[0] == "0"  # ... and the paper's
    assert dataset_info("mnist", paper=True).templates == ('a photo of the number: "{c}".',)


# ---------------------------------------------------------------------------- image folders

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _png(path: Path, color, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _make_flat(root: Path, classes, per_class=5) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"img{i}.png", COLORS[c])


def _color_label(images: torch.Tensor) -> list[int]:
    """Index of the nearest of COLORS for each image's corner pixel (JPEG is lossy)."""
    px = images[:, 0, 0, :].double()
    return torch.cdist(px, torch.tensor(COLORS, dtype=torch.float64)).argmin(1).tolist()


def test_flat_imagefolder(tmp_path):
    root = tmp_path / "my_pets"
    _make_flat(root, ["big_cat", "dog", "hamster"])
    d = load_domain("imagefolder", data=root, image_size=16, val_fraction=0)
    assert d.name == "my_pets" and d.source == f"imagefolder:{root}"
    assert d.classnames == ("big cat", "dog", "hamster")
    assert d.templates == T.GENERIC_TEMPLATES
    tr, te = d.split("train"), d.split("test")
    assert tr.images.shape == (12, 16, 16, 3) and te.images.shape == (3, 16, 16, 3)
    assert tr.class_counts(3).tolist() == [4, 4, 4] and te.class_counts(3).tolist() == [1, 1, 1]
    # labels follow the folders; constant images survive crop + resize exactly
    assert _color_label(tr.images) == tr.labels.tolist()
    assert (tr.images == tr.images[:, :1, :1, :]).all()
    # deterministic; same result through load_domain(path)
    again = load_domain(str(root), image_size=16, val_fraction=0)
    assert again.content_hash == d.content_hash and torch.equal(again.split("test").labels, te.labels)
    # content hash = sha256 over sorted "relpath\0sha256(bytes)\n"
    files = sorted(p for p in root.rglob("*.png"))
    lines = sorted(
        f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in files
    )
    assert d.content_hash == hashlib.sha256("".join(lines).encode()).hexdigest()
    _png(root / "dog" / "img0.png", (1, 2, 3))
    assert load_domain(root, val_carve="stratified").content_hash != d.content_hash  # solid colours: one group a class
    with pytest.raises(DataError, match="no split 'pool'. Available: train, test"):
        d.split("pool")


def test_flat_split_depends_on_seed_only(tmp_path):
    root = tmp_path / "f"
    for c in range(2):
        for i in range(10):
            _png(root / f"c{c}" / f"{i}.png", (100 * c, 20 * i, 0), size=(8, 8))  # green = file index

    def test_files(seed):
        d = load_domain("imagefolder", data=root, image_size=8, seed=seed, val_fraction=0)
        te, tr = d.split("test"), d.split("train")
        assert te.class_counts(2).tolist() == [2, 2]  # round(0.2 * 10) per class
        ids = {(c, g // 20) for c, g in zip(te.labels.tolist(), te.images[:, 0, 0, 1].tolist())}
        tr_ids = {(c, g // 20) for c, g in zip(tr.labels.tolist(), tr.images[:, 0, 0, 1].tolist())}
        assert not ids & tr_ids and len(ids | tr_ids) == 20  # disjoint, complete
        return ids, d.content_hash

    (a, ha), (b, hb), (c, hc) = test_files(0), test_files(0), test_files(1)
    assert a == b and a != c
    assert ha == hb == hc  # uncapped: the hash covers every file, whatever the split
    capped = load_domain("imagefolder", data=root, image_size=8, max_per_split=3, val_fraction=0)
    assert len(capped.split("train")) == 3 and capped.content_hash != ha


def test_split_layout_known_dataset(tmp_path):
    root = tmp_path / "EuroSAT"
    for s, n in (("train", 3), ("test", 2)):
        for c, folder in enumerate(["AnnualCrop", "forest", "Sea_Lake"]):
            for i in range(n):
                _png(root / s / folder / f"{i}.jpg", COLORS[c], size=(20, 20))
    with pytest.warns(DataWarning, match="no images of 7 of 10 classes"):
        d = load_domain("eurosat", data=root, image_size=8, max_per_split=4, val_fraction=0)
    assert d.name == "eurosat" and d.source == f"torchvision:{root}"
    assert d.classnames == T.EUROSAT_CLASSNAMES and d.num_classes == 10
    assert len(d.split("train")) == 4 and len(d.split("test")) == 4
    with pytest.warns(DataWarning):
        full = load_domain("eurosat", data=root, image_size=8, val_fraction=0)
    tr = full.split("train")
    assert sorted(set(tr.labels.tolist())) == [0, 1, 9]  # AnnualCrop, Forest, SeaLake
    colour_of = {0: 0, 1: 1, 9: 2}
    assert _color_label(tr.images) == [colour_of[y] for y in tr.labels.tolist()]
    assert tr.class_counts(10)[[0, 1, 9]].tolist() == [3, 3, 3]


def test_unmatched_and_numeric_folders(tmp_path):
    root = tmp_path / "eu"
    for folder in ("Forest", "Desert", "Moon"):
        _png(root / folder / "0.png", COLORS[0])
    with pytest.raises(DataError, match="class folders match no eurosat class: Desert, Moon"):
        load_domain("eurosat", data=root)
    g = tmp_path / "gtsrb"
    for folder in ("00000", "00014"):
        for i in range(6):
            _png(g / folder / f"{i}.ppm", COLORS[1])
    with pytest.warns(DataWarning):
        # not a mini-suite dir -> local copy; solid-colour copies are one near-duplicate group per class: val by labels
        d = load_domain("gtsrb", data=g, image_size=8, val_carve="stratified")
    assert d.num_classes == 43 and sorted(set(d.split("train").labels.tolist())) == [0, 14]


def test_empty_or_bad_folders(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in"):
        load_domain("imagefolder", data=tmp_path / "empty")
    with pytest.raises(DataError, match="pass data="):
        load_domain("imagefolder")
    bad = tmp_path / "bad"
    _png(bad / "a" / "0.png", COLORS[0])
    _png(bad / "a" / "1.png", COLORS[0])
    (bad / "a" / "2.png").write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot read image"):
        load_domain("imagefolder", data=bad)
    with pytest.raises(DataError, match="not a mini-suite directory"):
        load_domain("fashion", data=bad)


def test_split_validates_its_tensors():
    with pytest.raises(DataError, match="uint8"):
        Split(torch.zeros(2, 4, 4, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        Split(torch.zeros(2, 4, 4, 1, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    s = Split(torch.zeros(2, 4, 4, 1, dtype=torch.uint8), torch.tensor([1, 0]))
    assert len(s) == 2 and s.subset([1]).labels.tolist() == [0] and "n=2" in repr(s)


def test_val_folder_counts_as_test_and_lone_train_is_split(tmp_path):
    root = tmp_path / "tv"
    for s, n in (("train", 7), ("val", 2)):
        for c, folder in enumerate(["a", "b"]):
            for i in range(n):
                _png(root / s / folder / f"{i}.png", COLORS[c])
    d = load_domain("imagefolder", data=root, image_size=4, val_carve="stratified")  # solid colours: one group a class
    assert len(d.split("train")) + len(d.split("val")) == 14 and len(d.split("test")) == 4
    assert d.split("val").class_counts(2).tolist() == [1, 1]  # round(0.15 * 14), stratified
    lone = tmp_path / "lone"
    _make_flat(lone / "train", ["a", "b"], per_class=10)
    with pytest.warns(DataWarning, match="train/ without test/"):
        d = load_domain("imagefolder", data=lone, image_size=4, val_carve="stratified")
    assert d.classnames == ("a", "b") and len(d.split("train")) + len(d.split("val")) == 16
    assert len(d.split("test")) == 4
    extra = tmp_path / "extra"
    _png(extra / "train" / "a" / "0.png", COLORS[0])
    _png(extra / "test" / "z" / "0.png", COLORS[1])
    with pytest.raises(DataError, match="has classes not in train/: z"):
        load_domain("imagefolder", data=extra)


def test_validation_is_carved_from_train_disjoint_stratified_and_seed_stable():
    d = load_domain("mnist")
    raw = np.load(PACKAGE_MINISUITE / "mnist.npz")
    train, val = d.split("train"), d.split("val")
    assert len(train) + len(val) == raw["y_train"].shape[0] and len(val) == round(0.15 * raw["y_train"].shape[0])
    # disjoint and together exactly the file's train images
    seen = {bytes(x.numpy().tobytes()) for x in train.images} | {bytes(x.numpy().tobytes()) for x in val.images}
    assert len(seen) == len({bytes(x.tobytes()) for x in raw["x_train"]})
    full = torch.bincount(torch.from_numpy(raw["y_train"].astype(np.int64)), minlength=10).float()
    assert (val.class_counts(10).float() - 0.15 * full).abs().max() <= 1.0  # stratified
    again = load_domain("mnist")
    assert torch.equal(again.split("val").labels, val.labels)


# ---------------------------------------------------------------------------- bad inputs


def test_one_class_imagefolder_is_refused(tmp_path):
    flat = tmp_path / "solo"
    _make_flat(flat, ["cat"], per_class=10)
    with pytest.raises(DataError, match=r"^solo: split 'train' has images of 1 class\(es\) \(cat; 7 images\)"):
        load_domain("imagefolder", data=flat, image_size=4, val_carve="stratified")  # 8 train images, 1 to val
    with pytest.raises(DataError, match=r"^solo: split 'train' has images of 1 class\(es\) \(cat; 8 images\)"):
        load_domain("imagefolder", data=flat, image_size=4)  # solid colours, one near-duplicate group: none to val
    # two classes in train, one in test: the test split is named
    root = tmp_path / "lopsided"
    for s, classes in (("train", ["a", "b"]), ("test", ["a"])):
        _make_flat(root / s, classes, per_class=7)
    with pytest.raises(DataError, match=r"^mine: split 'test' has images of 1 class\(es\) \(a; 7 images\)"):
        load_domain("mine", data=root, image_size=4, val_carve="stratified")


def test_one_class_npz_split_is_refused(tmp_path):
    suite = _write_suite(tmp_path, "mnist", _tiny_arrays([1, 1]))
    with pytest.raises(DataError, match=r"^mnist: split 'test' has images of 1 class\(es\) \(b; 2 images\)"):
        load_domain("mnist", data=suite, val_fraction=0)
    # a validation split of one image holds one class
    suite = _write_suite(tmp_path, "mnist", _tiny_arrays([0, 1]))
    with pytest.raises(DataError, match=r"^mnist: split 'val' has images of 1 class\(es\)"):
        load_domain("mnist", data=suite, val_fraction=0.25, val_carve="stratified")  # four equal images: one group
    # the same copy with both classes in test and no val loads
    assert load_domain("mnist", data=suite, val_fraction=0).split("test").labels.tolist() == [0, 1]
    # and a one-class train split of the real mnist file is refused too
    with np.load(PACKAGE_MINISUITE / "mnist.npz") as z:
        arrays = {k: z[k] for k in z.files}
    keep = arrays["y_train"] == 3
    arrays["x_train"], arrays["y_train"] = arrays["x_train"][keep], arrays["y_train"][keep]
    suite = _write_suite(tmp_path, "mnist", arrays)
    with pytest.raises(DataError, match=r"^mnist: split 'train' has images of 1 class\(es\) \(three; "):
        load_domain("mnist", data=suite)


@pytest.mark.parametrize("name", ["mine", "imagefolder", "mnist", "fashion", "eurosat"])
def test_data_path_missing_or_a_file_is_named(tmp_path, name):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=rf"^{name}: data path {missing} does not exist\. \S"):
        load_domain(name, data=missing)
    a_file = tmp_path / "images.zip"
    a_file.write_bytes(b"PK")
    with pytest.raises(DataError, match=rf"^{name}: data path {a_file} is not a folder\. \S"):
        load_domain(name, data=str(a_file))


def test_val_fraction_out_of_range():
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(DataError, match="val_fraction must be in"):
            load_domain("mnist", val_fraction=bad)


# ---------------------------------------------------------------------------- split -> model inputs


def test_split_inputs_follow_the_backbone_config_only():
    import dataclasses

    from train.backbones import load_config
    from train.datasets.pixels import to_model_input
    from train.datasets import domain_for, model_inputs, split_inputs

    assert model_inputs is split_inputs
    tiny = load_config("tiny")
    d = load_domain("mnist")
    x, y = split_inputs(tiny, "mnist", "test", limit=5)
    x2, y2 = split_inputs(tiny, d, "test", limit=5)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(y, d.split("test").labels[:5])
    u = d.split("test").images[:5].double().permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (tiny.mean, tiny.std))
    assert torch.allclose(x.double(), (u / 255 - mean) / std, atol=1e-6)  # (u / 255 - mean) / std
    # a 48-px backbone: a name is loaded at 48 (uint8 resize), a 32-px Domain resized as floats
    big = dataclasses.replace(tiny, vision_cfg={**tiny.vision_cfg, "image_size": 48}, mean=(0.1, 0.2, 0.3))
    xb, _ = split_inputs(big, "mnist", "val", limit=3)
    at48 = domain_for(big, "mnist").split("val").images[:3]
    assert at48.shape == (3, 48, 48, 1)
    assert torch.equal(xb, to_model_input(at48, big.mean, big.std))
    xd, _ = split_inputs(big, d, "val", limit=3)
    assert xd.shape == (3, 3, 48, 48) and torch.equal(xd, to_model_input(d.split("val").images[:3], big.mean, big.std, 48))
    assert len(split_inputs(tiny, d, "val")[1]) == len(d.split("val"))
    with pytest.raises(DataError, match="limit must be >= 1"):
        split_inputs(tiny, d, "test", limit=0)
    with pytest.raises(DataError, match="already loaded domain"):
        split_inputs(tiny, d, "test", data=PACKAGE_MINISUITE)
    with pytest.raises(DataError, match="no split 'nope'"):
        split_inputs(tiny, d, "nope")
