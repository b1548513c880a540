"""Integrity: a flipped bit, a FIFO, a symlink loop or a stripped check file never changes an answer silently."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests._smoke import BACKBONE_ID, DOMAINS, LAMBDAS, one_thread, smoke_study
from tests.adversarial._helpers import common, refused, run, tree_hash
from train.datasets import load_domain
from train.datasets import imagefolder
from train.datasets.registry import DataWarning
from train.errors import DataError
from train.tensorio import CHECKSUM_KEY, read_metadata

TRANSFER = ["transfer", "--source", "mnist", "--target", "animals"]
STUDY_ARGS = ["--domains", *DOMAINS, *[a for lam in LAMBDAS for a in ("--lambda2", str(lam))], "--no-curvature",
              "--workers", "1"]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block blocks, e.g. reading a FIFO."""
    def boom(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------ tensors


def _flip_mantissa_bit(path: Path) -> None:
    """Flip the lowest mantissa bit of the first float32 of the data section: a finite, plausible value."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start] ^= 1
    path.write_bytes(bytes(data))


def test_flipped_bit_in_a_stored_vector_is_refused(store_copy, capsys):
    """One mantissa bit of θ_ft* used to give another E-RMSE with exit 0; now: exit 2, one line, store unchanged."""
    path = store_copy / BACKBONE_ID / "vectors" / "mnist" / "ftx-a0.8.safetensors"
    assert CHECKSUM_KEY in read_metadata(path)
    _flip_mantissa_bit(path)
    line = refused(capsys, [*TRANSFER, *common(store_copy)], "is damaged", store_copy)
    assert str(path) in line and "--rebuild" in line


def test_verify_lists_exactly_the_damaged_files(store_copy, capsys):
    code, out, err = run(capsys, ["verify", "--store", store_copy, "--json"])
    report = json.loads(out)
    assert code == 0 and report["counts"]["damaged"] == 0 and report["counts"]["unchecked"] == 0, err
    assert report["counts"]["ok"] >= 3 * len(DOMAINS)
    damaged = store_copy / BACKBONE_ID / "heads" / "gtsrb.safetensors"
    _flip_mantissa_bit(damaged)
    before = tree_hash(store_copy)
    code, out, _ = run(capsys, ["verify", "--store", store_copy, "--json"])
    report = json.loads(out)
    assert code == 1 and report["counts"]["damaged"] == 1
    assert [f["path"] for f in report["files"]] == [str(damaged)]
    assert tree_hash(store_copy) == before  # verify only reads


# -------------------------------------------------------------------------- image folders


def _folder(root: Path) -> Path:
    """Two classes of five 12×12 images each: 10 images."""
    for c, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        for i in range(5):
            path = root / f"class{c}" / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), tuple(min(255, v + 9 * i) for v in color)).save(path)
    return root


def _load(root: Path):
    with deadline(60), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        domain = load_domain("imagefolder", data=root, image_size=8, val_fraction=0)
    return domain, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def test_special_files_and_symlink_loops_in_a_folder(tmp_path):
    """A FIFO hung the build, a link to /dev/zero ran out of memory, a folder loop listed 810 of 10 images."""
    clean, _ = _load(_folder(tmp_path / "clean"))
    root = _folder(tmp_path / "user")
    os.mkfifo(root / "class0" / "zz.png")
    (root / "class1" / "zz.png").symlink_to("/dev/zero")
    (root / "class1" / "loop").symlink_to(root / "class1", target_is_directory=True)
    (root / "class0" / "again").symlink_to(root / "class1", target_is_directory=True)  # class1 reached twice
    (root / "class0" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    domain, lines = _load(root)
    n = sum(len(s.labels) for s in domain.splits.values())
    assert n == 10 + 5  # the folder's 10 images, plus class1's five once more through class0/again
    # the FIFO, the dangling link, and the /dev/zero link twice (in class1, and in class1 through class0/again)
    assert len(lines) == 1 and "skipped 4 image-named file(s)" in lines[0]
    # without the link that lists class1 inside class0, the answer is the clean folder's
    (root / "class0" / "again").unlink()
    domain, _ = _load(root)
    assert sum(len(s.labels) for s in domain.splits.values()) == 10
    assert domain.content_hash == clean.content_hash


def test_too_many_pixels_or_bytes_are_refused_before_decoding(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12×12 = 144 pixels: a "bomb" at this limit
    with pytest.raises(DataError, match="decompression-bomb limit"):
        _load(root)
    monkeypatch.undo()
    monkeypatch.setattr(imagefolder, "MAX_IMAGE_BYTES", 16)
    with pytest.raises(DataError, match="more than an image file may have"):
        _load(root)


# ---------------------------------------------------------------------------- study tables


def _study_copy(tmp_path: Path, capsys) -> tuple[Path, Path]:
    store, out, _ = smoke_study()
    capsys.readouterr()  # a first build's device notice is not the commands' output
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    work = root / BACKBONE_ID / "studies" / out.name
    return root, work


def test_table_without_check_file_is_untrusted_until_verified(tmp_path, capsys):
    root, work = _study_copy(tmp_path, capsys)
    table = work / "pairs.csv"
    (work / "pairs.csv.check.json").unlink()
    refused(capsys, ["correlate", "--study", work, "--n-boot", "5", "--n-perm", "5", *common(root)],
            "no check file", root)
    line = refused(capsys, ["study", *STUDY_ARGS, *common(root)], "no check file", root)
    assert "--verify" in line
    # an edited value is found by recomputation; nothing is written
    original = table.read_bytes()
    edited = pd.read_csv(table, dtype=str, keep_default_na=False)
    edited.loc[0, "accuracy"] = str(float(edited.loc[0, "accuracy"]) + 0.01)
    edited.to_csv(table, index=False)
    refused(capsys, ["study", "--verify", *STUDY_ARGS, *common(root)], "its recomputation gives", root)
    # the untouched table is re-certified, and then read as before
    table.write_bytes(original)
    with one_thread():
        code, out, err = run(capsys, ["study", "--verify", *STUDY_ARGS, *common(root)])
    assert code == 0, err
    assert json.loads(out)["tables"][0]["certified"] and table.read_bytes() == original
    code, _, err = run(capsys, ["correlate", "--study", work, "--n-boot", "5", "--n-perm", "5", *common(root)])
    assert code == 0, err


def test_damaged_check_file_is_refused_before_anything_is_written(tmp_path, capsys):
    root, work = _study_copy(tmp_path, capsys)
    check = work / "pairs.csv.check.json"
    check.write_bytes(check.read_bytes() + b"\0\0\0")
    refused(capsys, ["study", *STUDY_ARGS, *common(root)], "check file", root)
    refused(capsys, ["rank-sources", "--target", "gtsrb", *common(root)], "check file", root)


def test_same_study_twice_gives_the_same_bytes(tmp_path):
    """Two uninterrupted studies with the same inputs: every file identical (timings live in side files)."""
    from diag.study.run import run_study, StudySettings

    store, out, _ = smoke_study()
    again = tmp_path / "again"
    with one_thread():
        run_study(store, DOMAINS, StudySettings(lambda2s=LAMBDAS, curvature=False), out_dir=again, progress=False)

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
                if p.is_file() and not p.name.endswith(".timings.json")}

    a, b = digests(again), digests(out)  # the shared folder may also hold figures other tests drew from it
    assert {"pairs.csv", "pairs.csv.check.json", "pairs.csv.provenance.json"} <= set(a)
    assert {k: b[k] for k in a} == a
    assert "seconds" not in (out / "pairs.csv").read_text().splitlines()[0].split(",")
    assert json.loads((out / "pairs.csv.timings.json").read_text())


def test_study_table_records_its_provenance():
    """Commit, settings, threads and each vector's key and checksum beside the table (no wall-clock values)."""
    from diag.study.provenance import code_version

    _, out, _ = smoke_study()
    prov = json.loads((out / "pairs.csv.provenance.json").read_text())
    (run, entry), = prov.items()
    assert run == "alpha=0.8 seed=0 variant=paper"
    assert entry["code"] == code_version() and len(entry["code"]["commit"]) in (40, len("unknown"))
    assert entry["settings"]["lambda2s"] == list(LAMBDAS) and entry["torch_threads"] == 1
    assert sorted(entry["domains"]) == sorted(DOMAINS)
    ft = entry["domains"]["mnist"]["ft"]
    assert ft[CHECKSUM_KEY] and ft["torch_threads"] == "1" and ft["key"]


def test_verify_compares_missing_text_values():
    """Text columns read as strings hold pandas' NA: missing equals missing, never a value."""
    from diag.study.verify import _differs

    assert not _differs(pd.NA, None, "other_source") and not _differs(float("nan"), pd.NA, "ermse")
    assert _differs(pd.NA, "mnist", "other_source") and _differs("mnist", "gtsrb", "other_source")
    assert not _differs(1.0, 1.0 + 1e-9, "ermse") and _differs(1.0, 1.01, "ermse")
