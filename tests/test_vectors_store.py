import math

import pytest
import torch
from safetensors.torch import save_file

from train.errors import ArtifactError, BaseMismatchError, StoreError
from train.tensorio import load_tensors, save_tensors
from train.vectors import TaskVector


def vec(values, base="b0", key="w"):
    return TaskVector({key: torch.tensor(values, dtype=torch.float32)}, base_hash=base)


def test_arithmetic_matches_elementwise():
    a, b = vec([1.0, 2.0]), vec([3.0, -1.0])
    assert (a + b).tensors["w"].tolist() == [4.0, 1.0]
    assert (a - b).tensors["w"].tolist() == [-2.0, 3.0]
    assert (0.5 * a).tensors["w"].tolist() == [0.5, 1.0]
    assert (-a).tensors["w"].tolist() == [-1.0, -2.0]
    assert sum([a, b, a]).tensors["w"].tolist() == [5.0, 3.0]
    assert math.isclose(a.norm(), math.sqrt(5.0))
    assert math.isclose(a.cosine(b), (3 - 2) / (math.sqrt(5) * math.sqrt(10)))


def test_apply_to_adds_scaled_vector_and_checks_base():
    base = {"w": torch.tensor([1.0, 1.0]), "other": torch.tensor([7.0])}
    out = vec([1.0, 2.0]).apply_to(base, scale=2.0, base_hash="b0")
    assert out["w"].tolist() == [3.0, 5.0] and out["other"].tolist() == [7.0]
    with pytest.raises(BaseMismatchError):
        vec([1.0, 2.0]).apply_to(base, base_hash="other-base")
    with pytest.raises(BaseMismatchError):
        vec([1.0, 2.0, 3.0]).apply_to(base)


def test_arithmetic_across_bases_or_shapes_is_refused():
    with pytest.raises(BaseMismatchError):
        vec([1.0]) + vec([1.0], base="b1")
    with pytest.raises(BaseMismatchError):
        vec([1.0]) + vec([1.0, 2.0])
    with pytest.raises(BaseMismatchError):
        vec([1.0]) - vec([1.0], key="v")


def test_random_like_keeps_per_tensor_norms():
    a = TaskVector({"w": torch.randn(10, 3), "b": torch.randn(5)}, "b0")
    r = a.random_like(seed=3)
    for key, norm in a.tensor_norms().items():
        assert math.isclose(r.tensor_norms()[key], norm, rel_tol=1e-5)
    assert abs(r.cosine(a)) < 0.9


def test_save_load_roundtrip_with_provenance(tmp_path):
    a = TaskVector({"w": torch.randn(4, 4)}, "b0", {"domain": "mnist", "alpha": "0.8"})
    path = a.save(tmp_path / "v.safetensors")
    b = TaskVector.load(path, expect_base="b0")
    assert torch.equal(a.tensors["w"], b.tensors["w"])
    assert b.provenance["domain"] == "mnist" and "tvdiag_version" in b.provenance
    with pytest.raises(BaseMismatchError):
        TaskVector.load(path, expect_base="b1")
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file"


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "v.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ArtifactError, match="pickle"):
        TaskVector.load(path)
    import pickle

    path.write_bytes(pickle.dumps({"w": [0.0]}))
    with pytest.raises(ArtifactError, match="pickle"):
        load_tensors(path)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    path = vec([1.0, 2.0, 3.0]).save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5])
    with pytest.raises(ArtifactError):
        TaskVector.load(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx")
    with pytest.raises(ArtifactError):
        TaskVector.load(path)


def test_nan_and_inf_are_refused(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(path), metadata={"base_hash": "b0"})
    with pytest.raises(ArtifactError, match="NaN"):
        TaskVector.load(path)
    save_file({"w": torch.tensor([float("inf")])}, str(path), metadata={"base_hash": "b0"})
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        TaskVector.load(path)


def test_unwritable_store_raises_store_error(tmp_path):
    # a regular file where the store folder should be: unwritable even for root
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError):
        save_tensors(blocker / "sub" / "x.safetensors", {"w": torch.zeros(1)})
    assert blocker.read_text() == "not a folder"


def test_failed_write_keeps_previous_file(tmp_path):
    path = vec([1.0]).save(tmp_path / "v.safetensors")
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_tensors(path, {"w": "not a tensor"})  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_valid_file_whose_header_length_starts_with_pickle_byte_loads(tmp_path):
    # a safetensors header length whose low byte is 0x80 must not be mistaken for a pickle
    path = tmp_path / "v.safetensors"
    for pad in range(300):
        TaskVector({"w": torch.ones(3)}, "b0", {"pad": "x" * pad}).save(path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert TaskVector.load(path).tensors["w"].tolist() == [1.0, 1.0, 1.0]


def test_writer_roundtrips_every_dtype_and_shape_like_safetensors(tmp_path):
    """tvdiag's own (sorted, byte-reproducible) encoder reads back exactly through safetensors."""
    from safetensors.torch import load_file

    tensors = {"f64": torch.randn(3, 2, dtype=torch.float64), "bf16": torch.randn(4).to(torch.bfloat16),
               "f16": torch.randn(2, 2).half(), "i64": torch.arange(5), "i8": torch.tensor([-1, 2], dtype=torch.int8),
               "u8": torch.tensor([255], dtype=torch.uint8), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "t": torch.arange(6.0).reshape(2, 3).t()}
    path = save_tensors(tmp_path / "x.safetensors", tensors, {"note": "é"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert torch.equal(back[key], value.contiguous())
    loaded, meta = load_tensors(path)
    assert meta["note"] == "é" and meta["tvdiag_version"]
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_unsupported_value_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_tensors(tmp_path / "sub" / "x.safetensors", {"w": torch.zeros(2, dtype=torch.complex64)})
    assert not (tmp_path / "sub").exists()
