"""Model-input conversion and batching (train/datasets/pixels.py)."""

from __future__ import annotations

import pytest
import torch

from train.datasets.pixels import CLIP_MEAN, CLIP_STD, iterate_batches, resize_uint8, to_model_input
from train.datasets import Split
from train.errors import DataError


def test_to_model_input_matches_formula():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (3, 5, 7, 3), generator=g, dtype=torch.uint8)
    x = to_model_input(u)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 5, 7)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    ref = (u.double().permute(0, 3, 1, 2) / 255 - mean) / std
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-6)


def test_grayscale_repeats_and_hand_values():
    u = torch.tensor([[[[0]], [[255]]]], dtype=torch.uint8)  # (1, 2, 1, 1)
    x = to_model_input(u, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 2, 1)
    assert x[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert x[0, :, 1, 0].tolist() == [1.0, 1.0, 1.0]


def test_resize():
    u = torch.full((2, 8, 8, 3), 77, dtype=torch.uint8)
    x = to_model_input(u, size=16)
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x, to_model_input(torch.full((2, 16, 16, 3), 77, dtype=torch.uint8)))
    r = resize_uint8(u, 5)
    assert r.shape == (2, 5, 5, 3) and (r == 77).all()
    assert resize_uint8(u, 8) is u


def test_bad_input():
    with pytest.raises(DataError, match="uint8"):
        to_model_input(torch.zeros(1, 4, 4, 3))
    with pytest.raises(DataError, match="1 or 3 channels"):
        to_model_input(torch.zeros(1, 4, 4, 2, dtype=torch.uint8))


def test_iterate_batches():
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 1).contiguous()
    labels = torch.arange(10)
    batches = list(iterate_batches((imgs, labels), 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    split = Split(imgs, labels)
    seen = []
    for x, y in iterate_batches(split, 3, shuffle=True, generator=torch.Generator().manual_seed(1)):
        assert x.dtype == torch.uint8 and torch.equal(x[:, 0, 0, 0].long(), y)
        seen += y.tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))
    again = [
        y.tolist()
        for _, y in iterate_batches(split, 3, shuffle=True, generator=torch.Generator().manual_seed(1))
    ]
    assert [y for batch in again for y in batch] == seen
    with pytest.raises(DataError, match="batch_size"):
        next(iterate_batches(split, 0))
    with pytest.raises(DataError, match="10 images but 9 labels"):
        next(iterate_batches((imgs, labels[:9]), 2))


def test_data_does_not_import_datasets():
    """train.datasets.pixels sits below train.datasets (which imports it): no import back, even for typing."""
    import ast
    from pathlib import Path

    import train.datasets.pixels

    tree = ast.parse(Path(train.datasets.pixels.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported and not any(m.startswith("train.") and m != "train.errors" for m in imported), imported
