"""CLI smoke runs through ``main([...])`` on the smoke store, and every bad-input path."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from diag.cli import main
from tests._smoke import BACKBONE_ID, smoke_store
from train.vectors import TaskVector


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def common(root):
    return ["--store", str(root), "--preset", "smoke", "--quiet"]


@pytest.fixture(scope="module")
def store():
    return smoke_store()


@pytest.fixture()
def store_copy(store, tmp_path):
    """A private copy of the smoke store that a test may damage."""
    dst = tmp_path / "store"
    shutil.copytree(store.root, dst)
    return dst


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def test_transfer_json_schema_and_invariants(store, capsys):
    code, out, err = run(capsys, "transfer", "--source", "mnist", "--target", "gtsrb", "--json", *common(store.root))
    assert code == 0, err
    res = json.loads(out)
    assert {"source", "target", "lambda1", "lambda2", "rows"} <= set(res)
    models = [r["model"] for r in res["rows"]]
    for name in ("zero-shot θ_base", "θ_ftˢ", "θ_ft*ˢ", "θ_ftᵀ", "proposed", "θ_ft*ᵀ (upper bound)"):
        assert name in models
    assert any(m.startswith("control: random") for m in models)
    assert any("mean φ map" in m for m in models)
    for r in res["rows"]:
        assert {"model", "accuracy", "ermse", "kendall", "iou1", "iou5", "iou10"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ermse"] <= 2.0 + 1e-9 and -1 <= r["kendall"] <= 1
        assert r["ks"] == [1, 1, 3]  # K = floor(k·M/49) at M = 16 (diag.transfer.metrics.scaled_ks)
    # λ2 = 0 and λ1 = 1: the proposed model is θ_ftᵀ itself
    code, out, _ = run(capsys, "transfer", "--source", "mnist", "--target", "gtsrb", "--lambda2", "0", "--json",
                       "--no-controls", *common(store.root))
    rows = {r["model"]: r for r in json.loads(out)["rows"]}
    assert rows["proposed"]["accuracy"] == pytest.approx(rows["θ_ftᵀ"]["accuracy"])
    assert rows["proposed"]["ermse"] == pytest.approx(rows["θ_ftᵀ"]["ermse"], abs=1e-6)


def test_transfer_human_table(store, capsys):
    code, out, _ = run(capsys, "transfer", "--source", "animals", "--target", "mnist", *common(store.root))
    assert code == 0
    assert "proposed" in out and "√2" in out and "K=(1, 1, 3)" in out


def _assert_bad(capsys, argv, match, root=None):
    before = snapshot(root) if root is not None else None
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and match in lines[0], err
    if root is not None:
        assert snapshot(root) == before, "bad input must not write or overwrite anything"


def test_unknown_domain(store, capsys):
    _assert_bad(capsys, ["transfer", "--source", "mnistt", "--target", "gtsrb", *common(store.root)],
                "Unknown domain 'mnistt'. Available:", store.folder)


def test_unknown_backbone(tmp_path, capsys):
    _assert_bad(capsys, ["transfer", "--source", "mnist", "--target", "gtsrb", "--backbone", "vit-b-33",
                         "--store", str(tmp_path), "--quiet"], "Unknown backbone 'vit-b-33'")
    assert not any(tmp_path.iterdir())


def test_alpha_out_of_range(store, capsys):
    _assert_bad(capsys, ["transfer", "--source", "mnist", "--target", "gtsrb", "--alpha", "1.5",
                         *common(store.root)], "argument --alpha: '1.5'", store.folder)


def test_corrupt_truncated_safetensors(store_copy, capsys):
    path = store_copy / BACKBONE_ID / "vectors" / "gtsrb" / "ft.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    _assert_bad(capsys, ["transfer", "--source", "mnist", "--target", "gtsrb", *common(store_copy)],
                "Corrupt or truncated", store_copy)


def test_pickle_instead_of_safetensors(store_copy, capsys):
    path = store_copy / BACKBONE_ID / "vectors" / "mnist" / "ft.safetensors"
    torch.save({"w": torch.zeros(3)}, path)
    _assert_bad(capsys, ["transfer", "--source", "mnist", "--target", "gtsrb", *common(store_copy)],
                "pickle", store_copy)


def _rewrite(path: Path, mutate):
    vec = TaskVector.load(path)
    tensors, prov, base = mutate(dict(vec.tensors), dict(vec.provenance), vec.base_hash)
    TaskVector(tensors, base, prov).save(path)


def test_nan_in_vector(store_copy, capsys):
    path = store_copy / BACKBONE_ID / "vectors" / "mnist" / "ftx-a0.8.safetensors"

    def poison(t, p, b):
        k = next(iter(t))
        t[k] = t[k].clone()
        t[k].view(-1)[0] = float("nan")
        return t, p, b

    _rewrite(path, poison)
    _assert_bad(capsys, ["transfer", "--source", "mnist", "--target", "gtsrb", *common(store_copy)],
                "NaN or Inf", store_copy)


def test_vector_of_another_base(store_copy, capsys):
    path = store_copy / BACKBONE_ID / "vectors" / "animals" / "ft.safetensors"
    _rewrite(path, lambda t, p, b: (t, p, "0123456789abcdef"))
    _assert_bad(capsys, ["transfer", "--source", "animals", "--target", "gtsrb", *common(store_copy)],
                "base", store_copy)


def test_vector_of_another_shape(store_copy, capsys):
    path = store_copy / BACKBONE_ID / "vectors" / "animals" / "ftx-a0.8.safetensors"

    def shrink(t, p, b):
        k = next(iter(t))
        t[k] = t[k].reshape(-1)[:-1].clone()
        return t, p, b

    _rewrite(path, shrink)
    _assert_bad(capsys, ["transfer", "--source", "animals", "--target", "gtsrb", *common(store_copy)],
                "mismatch", store_copy)


def test_empty_data_folder(store, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_bad(capsys, ["transfer", "--source", "mnist", "--target", "mine", "--data", f"mine={empty}",
                         *common(store.root)], "no images", store.folder)


def test_label_out_of_range(store, tmp_path, capsys, monkeypatch):
    """A mini-suite copy whose labels exceed the class count (manifest hash updated to match)."""
    import hashlib

    import numpy as np

    src = Path(__file__).resolve().parent.parent / "data" / "minisuite"
    dst = tmp_path / "minisuite"
    shutil.copytree(src, dst)
    with np.load(dst / "mnist.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][0] = 99
    np.savez(dst / "mnist.npz", **arrays)
    manifest = json.loads((dst / "MANIFEST.json").read_text())
    manifest["domains"]["mnist"]["sha256"] = hashlib.sha256((dst / "mnist.npz").read_bytes()).hexdigest()
    (dst / "MANIFEST.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("TVDIAG_DATA", str(dst))
    _assert_bad(capsys, ["transfer", "--source", "animals", "--target", "mnist", *common(store.root)],
                "label", store.folder)


def test_unwritable_store(tmp_path, capsys):
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store folder should be")
    _assert_bad(capsys, ["zoo", "--domains", "mnist", "--store", str(blocker), "--preset", "smoke", "--quiet"],
                "cannot be created")
    assert blocker.read_text().startswith("a file")
