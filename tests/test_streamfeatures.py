"""The streamed tier-0/1 features equal a dense float64 computation on whole vectors.

Sources of the three kinds (ft + star, ft + ftx, star alone), a card that covers all but one
parameter, parameters of several block groups and sizes (one larger than a streaming chunk).
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from diag.features.mapped import CardStream, TensorFile
from diag.openworld import Source
from diag.features.similarity import block_group
from diag.features.streamed import stream_features

SHAPES = {"visual.conv1.weight": (6, 3, 2, 2), "visual.class_embedding": (6,),
          "visual.transformer.resblocks.0.attn.in_proj_weight": (18, 6),
          "visual.transformer.resblocks.0.mlp.c_fc.weight": (97, 701),   # 67,997 values: 17 chunks of 4096
          "visual.transformer.resblocks.1.mlp.c_fc.weight": (24, 6), "visual.proj": (6, 4)}
K = 3


def _rand(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * scale).float() for k, s in SHAPES.items()}


def _save(path, tensors: dict, **meta) -> TensorFile:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"base_hash": "b", **meta})
    return TensorFile(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    base = _rand(0, 0.02)
    target = {k: v + w for (k, v), w in zip(base.items(), _rand(1, 1e-3).values())}
    ft = [_rand(10 + i, 1e-3) for i in range(3)]
    star = [_rand(20 + i, 1e-3) for i in range(3)]
    ftx = {k: ft[1][k] + star[1][k] for k in SHAPES}          # source 1: τ* = τ_ft* − τ_ft
    sources = [Source("a", _save(d / "a_ft.st", ft[0]), star=_save(d / "a_star.st", star[0])),
               Source("b", _save(d / "b_ft.st", ft[1]), ftx=_save(d / "b_ftx.st", ftx)),
               Source("c", None, star=_save(d / "c_star.st", star[2]))]
    covered = [k for k in SHAPES if k != "visual.proj"]
    D = sum(math.prod(SHAPES[k]) for k in covered)
    g = torch.Generator().manual_seed(5)
    card = {"eigvals": torch.tensor([9.0, 4.0, 0.5], dtype=torch.float64),
            "eigvecs": torch.linalg.qr(torch.randn(D, K, generator=g, dtype=torch.float64))[0].contiguous(),
            "residual_diag": torch.rand(D, generator=g, dtype=torch.float64)}
    save_file(card, str(d / "card.st"), metadata={
        "format": _card_format(), "param_names": json.dumps(covered),
        "param_shapes": json.dumps([list(SHAPES[k]) for k in covered]), "provenance": "{}"})
    star_b = {k: ftx[k].double() - ft[1][k].double() for k in SHAPES}  # τ* of b from the stored values
    truth = {"base": base, "target": target, "ft": [ft[0], ft[1], None], "star": [star[0], star_b, star[2]], "card": card,
             "covered": covered}
    return _save(d / "target.st", target), _save(d / "base.st", base), sources, CardStream(d / "card.st"), truth


def _card_format():
    from diag.curvature.card import CARD_FORMAT

    return CARD_FORMAT


def _flat(t: dict, keys) -> torch.Tensor:
    return torch.cat([t[k].double().reshape(-1) for k in keys])


def _dense(truth) -> tuple[list[dict], float, float]:
    """The features from whole float64 vectors."""
    keys = list(SHAPES)
    tau_t = {k: truth["target"][k].double() - truth["base"][k].double() for k in keys}
    groups = sorted({block_group(k) for k in keys})
    c = truth["card"]
    l, V, r = c["eigvals"], c["eigvecs"], c["residual_diag"]
    rows = []
    for ft, star in zip(truth["ft"], truth["star"]):
        s = _flat(star, truth["covered"])
        row = {"norm_star_source": _flat(star, keys).norm().item(),
               "risk_card": (l * (V.T @ s) ** 2).sum().item() + (r * s * s).sum().item(),
               "risk_diag": (r * s * s).sum().item() + (l * ((V * V).T @ (s * s))).sum().item()}
        if ft is not None:
            f, t = _flat(ft, keys), _flat(tau_t, keys)
            row["cos_ft"] = (f @ t / (f.norm() * t.norm())).item()
            row["norm_ft_source"] = f.norm().item()
            for g in groups:
                gk = [k for k in keys if block_group(k) == g]
                fg, tg = _flat(ft, gk), _flat(tau_t, gk)
                row[f"cos_ft.{g}"] = (fg @ tg / (fg.norm() * tg.norm())).item()
        rows.append(row)
    return rows, _flat(tau_t, keys).norm().item(), _flat(truth["base"], keys).norm().item()


@pytest.mark.parametrize("chunk, threads", [(4096, 1), (1 << 19, 1), (4096, 3)])
def test_stream_features_equal_dense_float64(world, chunk, threads, monkeypatch):
    """Whole blocks, blocks taken 4096 values at a time (the larger ones in several chunks), and three workers."""
    import diag.features.streamed

    monkeypatch.setattr(diag.features.streamed, "CHUNK", chunk)
    target, base, sources, card, truth = world
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, nt, nb = stream_features(target, base, sources, card, list(SHAPES))
        assert torch.get_num_threads() == threads  # restored after the pass
    finally:
        torch.set_num_threads(before)
    want, nt_want, nb_want = _dense(truth)
    assert nt == pytest.approx(nt_want, rel=1e-12) and nb == pytest.approx(nb_want, rel=1e-12)
    for got, exp, name in zip(rows, want, "abc"):
        assert got["source"] == name
        assert ("cos_ft" in got) == ("cos_ft" in exp)
        for key, value in exp.items():
            assert got[key] == pytest.approx(value, rel=1e-10), (name, key)
        assert got["norm_ft_target"] == pytest.approx(nt_want, rel=1e-12)


def test_cosine_of_a_vector_with_itself_is_one(world, tmp_path):
    """float64 accumulation: cos(τ, τ) is 1 to 1e-12 (float32 sums gave 1.0001 at 88M parameters)."""
    target, base, _, _, truth = world
    tau = {k: (truth["target"][k].double() - truth["base"][k].double()).float() for k in SHAPES}
    same = Source("same", _save(tmp_path / "ft.st", tau), star=_save(tmp_path / "star.st", tau))
    rows, _, _ = stream_features(target, base, [same], None, list(SHAPES))
    assert rows[0]["cos_ft"] == pytest.approx(1.0, abs=1e-12)
    assert "risk_card" not in rows[0]


def test_tensorfile_views(tmp_path):
    """Views of a misaligned float64 tensor (after 3 float32 values) are its values; released pages read back."""
    from diag.bench.ranking import write_streamed

    a, b = torch.arange(3, dtype=torch.float32), torch.linspace(0, 1, 5, dtype=torch.float64)
    write_streamed(tmp_path / "m.safetensors", [("a", torch.float32, (3,), lambda: [a]),
                                                ("b", torch.float64, (5,), lambda: [b])], {})
    f = TensorFile(tmp_path / "m.safetensors")
    assert torch.equal(f.view("a"), a) and torch.equal(f.view("b"), b) and torch.equal(f.view("b", 1, 3), b[1:3])
    f.release("a")
    f.release("b", 1, 3)
    assert torch.equal(f.read("b"), b) and torch.equal(f.read("a", rows=(1, 3)), a[1:3])
    f.close()


def test_tensorfile_refuses_a_dtype_it_cannot_view(tmp_path):
    """A float8 tensor is named with the readable dtypes (not a KeyError at the first view)."""
    from train.errors import ArtifactError

    save_file({"x": torch.zeros(4, dtype=torch.float8_e4m3fn)}, str(tmp_path / "f8.st"))
    with pytest.raises(ArtifactError, match="dtype F8_E4M3; readable: .*F32"):
        TensorFile(tmp_path / "f8.st")


def test_damaged_card_names_what_it_lacks(tmp_path):
    """A card file with the format tag but no eigenvectors is refused by name (not a KeyError)."""
    from train.errors import ArtifactError

    save_file({"eigvals": torch.ones(1, dtype=torch.float64)}, str(tmp_path / "card.st"), metadata={
        "format": _card_format(), "param_names": "[]", "param_shapes": "[]"})
    with pytest.raises(ArtifactError, match="lacks eigvecs, residual_diag"):
        CardStream(tmp_path / "card.st")


def test_a_damaged_suite_study_is_an_error_not_no_study(tmp_path):
    """rank-sources' suite: no table → None (the cos proxy); a truncated table → ArtifactError, not the proxy."""
    from diag.openworld import _suite_table
    from train.errors import ArtifactError

    assert _suite_table(tmp_path, "t") is None and _suite_table(None, "t") is None
    (tmp_path / "pairs.csv").write_text("source,target\na,b")  # last line incomplete
    with pytest.raises(ArtifactError, match="truncated"):
        _suite_table(tmp_path, "t")
