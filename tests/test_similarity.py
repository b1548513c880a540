"""Streamed cosine similarities against dense float64 references on tiny-CLIP-shaped vectors."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from diag.features.similarity import (UnverifiedBaseWarning, VectorSpec, block_group, cosine_streamed, gram_streamed,
                                      similarity_matrices)
from diag.study import figures
from train.errors import ArtifactError, BaseMismatchError, UnknownNameError


@pytest.fixture(scope="module")
def shapes():
    from open_clip.model import CLIP

    tiny = CLIP(embed_dim=64,
                vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=4, head_width=32, mlp_ratio=4.0),
                text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=2))
    return {f"visual.{n}": tuple(p.shape) for n, p in tiny.visual.named_parameters()}


def make_vector(path, shapes, seed, base_hash="abc123", scale=None, like=None, mix=0.0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, shp in shapes.items():
        t = torch.randn(shp, generator=g, dtype=torch.float32) * (scale or 1.0)
        if like is not None:
            t = (mix * like[k] + (1 - mix) * t).float()
        tensors[k] = t.contiguous()
    meta = {} if base_hash is None else {"base_hash": base_hash}
    save_file(tensors, str(path), metadata=meta)
    return tensors


def flat(tensors, keys=None):
    keys = keys or list(tensors)
    return np.concatenate([tensors[k].double().numpy().ravel() for k in keys])


def dense_cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_block_group_names():
    assert block_group("visual.transformer.resblocks.3.mlp.c_fc.weight") == "block.3"
    assert block_group("visual.transformer.resblocks.12.attn.in_proj_weight") == "block.12"
    for k in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.bias"):
        assert block_group(k) == "embed"
    assert block_group("visual.ln_post.weight") == "head" and block_group("visual.proj") == "head"
    assert block_group("logit_scale") == "other"


def test_cosine_matches_dense(tmp_path, shapes):
    a = make_vector(tmp_path / "a.safetensors", shapes, 0)
    b = make_vector(tmp_path / "b.safetensors", shapes, 1, like=a, mix=0.3)
    res = cosine_streamed(tmp_path / "a.safetensors", tmp_path / "b.safetensors", by="block")
    fa, fb = flat(a), flat(b)
    np.testing.assert_allclose(res.cosine, dense_cos(fa, fb), rtol=1e-12)
    np.testing.assert_allclose(res.norm_a, np.linalg.norm(fa), rtol=1e-12)
    np.testing.assert_allclose(res.dot, fa @ fb, rtol=1e-12)
    assert res.numel == fa.size and 0.2 < res.cosine < 0.6
    assert list(res.groups) == ["embed", "block.0", "block.1", "block.2", "block.3", "head"]
    keys3 = [k for k in shapes if ".resblocks.3." in k]
    np.testing.assert_allclose(res.groups["block.3"].cosine, dense_cos(flat(a, keys3), flat(b, keys3)), rtol=1e-12)
    assert sum(g.numel for g in res.groups.values()) == res.numel
    d = res.to_dict()
    assert d["cosine"] == res.cosine and set(d["groups"]) == set(res.groups)
    assert list(res.to_frame().columns) == ["group", "cosine", "dot", "norm_a", "norm_b", "numel"]
    # per-tensor grouping and a parameter filter
    res_t = cosine_streamed(tmp_path / "a.safetensors", tmp_path / "b.safetensors", by="tensor")
    k = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    np.testing.assert_allclose(res_t.groups[k].cosine, dense_cos(flat(a, [k]), flat(b, [k])), rtol=1e-12)
    res_f = cosine_streamed(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                            param_filter="visual.transformer.resblocks.3.*")
    np.testing.assert_allclose(res_f.cosine, res.groups["block.3"].cosine, rtol=1e-12)
    assert res_f.groups == {}


def test_difference_spec_is_explainability_vector(tmp_path, shapes):
    d = {}
    for dom, seed in (("s", 10), ("t", 20)):
        (tmp_path / dom).mkdir()
        ft = make_vector(tmp_path / dom / "ft.safetensors", shapes, seed)
        ftx = make_vector(tmp_path / dom / "ftx-a0.8.safetensors", shapes, seed + 1, like=ft, mix=0.9)
        d[dom] = {k: ftx[k].double() - ft[k].double() for k in shapes}
    spec_s = VectorSpec.explainability(tmp_path / "s", alpha=0.8)
    assert spec_s.plus.name == "ftx-a0.8.safetensors" and spec_s.minus.name == "ft.safetensors"
    res = cosine_streamed(spec_s, VectorSpec.explainability(tmp_path / "t"), by="block")
    np.testing.assert_allclose(res.cosine, dense_cos(flat(d["s"]), flat(d["t"])), rtol=1e-10)
    np.testing.assert_allclose(res.norm_b, np.linalg.norm(flat(d["t"])), rtol=1e-12)


def test_refusals(tmp_path, shapes):
    make_vector(tmp_path / "a.safetensors", shapes, 0)
    make_vector(tmp_path / "other_base.safetensors", shapes, 1, base_hash="zzz999")
    with pytest.raises(BaseMismatchError, match="different base"):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "other_base.safetensors")
    fewer = dict(list(shapes.items())[:-1])
    make_vector(tmp_path / "fewer.safetensors", fewer, 2)
    with pytest.raises(BaseMismatchError, match="parameter names differ"):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "fewer.safetensors")
    reshaped = dict(shapes)
    reshaped["visual.proj"] = (64, 128)
    make_vector(tmp_path / "reshaped.safetensors", reshaped, 3)
    with pytest.raises(BaseMismatchError, match="visual.proj"):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "reshaped.safetensors")
    # a difference of files with another base is refused as well
    with pytest.raises(BaseMismatchError):
        cosine_streamed(VectorSpec(tmp_path / "a.safetensors", tmp_path / "other_base.safetensors"),
                        tmp_path / "a.safetensors")
    with pytest.raises(ArtifactError):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "junk.safetensors")
    t = make_vector(tmp_path / "nan.safetensors", shapes, 4)
    t["visual.proj"][0, 0] = float("nan")
    save_file(t, str(tmp_path / "nan.safetensors"), metadata={"base_hash": "abc123"})
    with pytest.raises(ArtifactError, match="non-finite"):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "nan.safetensors")
    with pytest.raises(UnknownNameError, match="Available: block, global, tensor"):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "a.safetensors", by="layer")
    make_vector(tmp_path / "nohash.safetensors", shapes, 5, base_hash=None)
    with pytest.warns(UnverifiedBaseWarning):
        cosine_streamed(tmp_path / "a.safetensors", tmp_path / "nohash.safetensors")


def test_similarity_matrix_and_heatmap(tmp_path, shapes):
    small = {k: v for k, v in shapes.items() if "resblocks.0" in k or "proj" == k.split(".")[-1]}
    vecs = {}
    base = make_vector(tmp_path / "d0.safetensors", small, 0)
    vecs["d0"] = base
    for i, mix in ((1, 0.8), (2, 0.0)):
        vecs[f"d{i}"] = make_vector(tmp_path / f"d{i}.safetensors", small, i, like=base, mix=mix)
    paths = {n: tmp_path / f"{n}.safetensors" for n in vecs}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C = similarity_matrices(paths, by="global")["global"]
    assert isinstance(C, pd.DataFrame) and list(C.index) == ["d0", "d1", "d2"]
    np.testing.assert_allclose(np.diag(C), 1.0, rtol=1e-12)
    np.testing.assert_allclose(C.to_numpy(), C.to_numpy().T, rtol=0, atol=0)
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(C.iloc[i, j], dense_cos(flat(vecs[f"d{i}"]), flat(vecs[f"d{j}"])), rtol=1e-10)
    assert C.loc["d0", "d1"] > 0.9 and abs(C.loc["d0", "d2"]) < 0.1
    mats = similarity_matrices(paths, by="block")
    assert set(mats) == {"global", "block.0", "head"}
    np.testing.assert_allclose(mats["global"].to_numpy(), C.to_numpy(), rtol=1e-12)
    G, groups, numel = gram_streamed(list(paths.values()), by="block")
    np.testing.assert_allclose(G, sum(groups.values()), rtol=1e-12)
    out = figures.plot_similarity_heatmap(C, tmp_path / "fig" / "heat.png", title="tau_ft")
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vector_similarity_in_memory_matches_streamed_and_dense(shapes, tmp_path):
    """The in-memory path (pair features) and the streamed path (heatmaps) share one float64 routine."""
    from diag.features.similarity import vector_similarity
    from train.vectors import TaskVector

    a = make_vector(tmp_path / "a.safetensors", shapes, 1)
    b = make_vector(tmp_path / "b.safetensors", shapes, 2, like=a, mix=0.4)
    va, vb = TaskVector.load(tmp_path / "a.safetensors"), TaskVector.load(tmp_path / "b.safetensors")
    mem = vector_similarity(va, vb, by="block")
    disk = cosine_streamed(tmp_path / "a.safetensors", tmp_path / "b.safetensors", by="block")
    fa, fb = flat(a), flat(b)
    assert mem.cosine == pytest.approx(fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb), rel=1e-12)
    assert mem.cosine == pytest.approx(disk.cosine, rel=1e-13) and mem.norm_a == pytest.approx(disk.norm_a, rel=1e-13)
    assert list(mem.groups) == list(disk.groups)
    for g in mem.groups:
        assert mem.groups[g].cosine == pytest.approx(disk.groups[g].cosine, rel=1e-12)
    with pytest.raises(BaseMismatchError):
        vector_similarity(va, TaskVector(vb.tensors, "other"))
