"""Open world, as the README's worked example runs it: import two externally fine-tuned sources into a
copy of the smoke store, build a target owner's Hessian card from a tiny ImageFolder, rank the
store's vectors for the target model with no target images; and the refusals (exit 2, store untouched)."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diag.cli import main
from tests._smoke import BACKBONE, BACKBONE_ID, one_thread, smoke_store


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A private copy of the smoke store, θ_base's whole-model state dict and the files of the example."""
    src = smoke_store()
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(src.folder, root / BACKBONE_ID, ignore=shutil.ignore_patterns("studies"))
    backbone, _ = src.load_base()
    return root, {k: v.detach().clone() for k, v in backbone.clip.state_dict().items()}


def _finetuned(whole: dict, seed: int, scale: float = 0.02) -> dict:
    """θ_base + a small seeded perturbation of the vision tower (an 'externally fine-tuned' model)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + scale * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=gen)
                if k.startswith("visual.") and v.is_floating_point() and v.numel() > 1 else v).contiguous()
            for k, v in whole.items()}


def _cli(*argv) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        digest.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
            img[..., c] = 255  # the class is the dominant channel
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return root


def test_worked_example(world, tmp_path):
    root, whole = world
    store = ["--store", str(root), "--preset", "smoke", "--quiet"]
    # two sources fine-tuned elsewhere: one whole CLIP model as safetensors, one visual tower as a .pt state dict
    save_file(_finetuned(whole, 1), tmp_path / "alpha_ft.safetensors")
    save_file(_finetuned(whole, 2), tmp_path / "alpha_ftx.safetensors")
    torch.save({k.removeprefix("visual."): v for k, v in _finetuned(whole, 3).items() if k.startswith("visual.")},
               tmp_path / "beta_ft.pt")
    star = {k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(4))
            for k, v in whole.items() if k.startswith("visual.")}
    save_file(star, tmp_path / "beta_star.safetensors")
    for kind, domain, name in (("ft", "alpha", "alpha_ft.safetensors"), ("ftx", "alpha", "alpha_ftx.safetensors"),
                               ("ft", "beta", "beta_ft.pt"), ("star", "beta", "beta_star.safetensors")):
        code, out = _cli("import", "--kind", kind, "--domain", domain, "--input", str(tmp_path / name), "--json", *store)
        assert code == 0, out
        rec = json.loads(out)
        assert rec["written"] and len(rec["sha256"]) == 64
    # importing the same file again writes nothing
    code, out = _cli("import", "--kind", "ft", "--domain", "alpha", "--input", str(tmp_path / "alpha_ft.safetensors"),
                     "--json", *store)
    assert code == 0 and json.loads(out)["written"] is False
    from train.store import Store

    st = Store(root, BACKBONE_ID)
    beta_star = st.explainability_vector("beta", 0.8)
    assert beta_star.base_hash == st.load_vector("alpha", "ft").base_hash
    assert torch.allclose(beta_star.tensors["visual.proj"], star["visual.proj"], atol=1e-6)

    # the target owner: a fine-tuned model and a few local images, never shared
    save_file(_finetuned(whole, 5), tmp_path / "target.safetensors")
    data = _image_folder(tmp_path / "pets")
    card = tmp_path / "card.safetensors"
    code, out = _cli("card", "--target", "pets", "--model", str(tmp_path / "target.safetensors"),
                     "--data", f"pets={data}", "--out", str(card), "--n-images", "8", "--probes", "4", "--k", "2",
                     "--card-form", "eig", "--json", *store)  # the eigenpair card, streamed (K-FAC: test_kfac_openworld)
    assert code == 0, out
    from diag.curvature.card import HessianCard

    loaded = HessianCard.load(card)
    assert loaded.k == 2 and loaded.trace_stderr is not None and loaded.trace_stderr >= 0
    assert len(loaded.provenance["model_sha256"]) == 64 and loaded.provenance["data_hash"]

    # rank the store's vectors (the suite's and the two imported) for the target model: tier 1, no images
    code, out = _cli("rank-sources", "--target", "pets", "--target-model", str(tmp_path / "target.safetensors"),
                     "--card", str(card), "--sources", str(root / BACKBONE_ID / "vectors"), "--json", *store)
    assert code == 0, out
    ranking = json.loads(out)
    names = [s["source"] for s in ranking["sources"]]
    # every source folder of the store (other tests may have added suite domains to the shared store)
    folders = sorted(p.name for p in (root / BACKBONE_ID / "vectors").iterdir()
                     if (p / "ft.safetensors").is_file() and (p / "ftx-a0.8.safetensors").is_file())
    assert sorted(names) == folders and {"alpha", "beta", "animals", "gtsrb", "mnist"} <= set(names)
    assert [s["rank"] for s in ranking["sources"]] == list(range(1, len(names) + 1))
    assert ranking["tier"] == 1 and all(s["risk_card"] is not None for s in ranking["sources"])
    cos = [s["cos_ft"] for s in ranking["sources"]]
    assert cos == sorted(cos, reverse=True)  # no suite study in this store: the cos(τ_ft) proxy
    assert any("proxy" in n for n in ranking["notes"])
    assert all(s["risk_card_calibrated"] is None for s in ranking["sources"])
    assert any(n.startswith("card risk not calibrated") for n in ranking["notes"])
    # the streamed risk is the card's R_card(τ*) = Σ l (vᵀτ*)² + Σ r τ*² on the materialised vector
    mnist = next(s for s in ranking["sources"] if s["source"] == "mnist")
    expected = loaded.risk(st.explainability_vector("mnist", 0.8).tensors)
    assert mnist["risk_card"] == pytest.approx(expected, rel=1e-4)

    # tier 0 with the suite's predictor: the smoke study's known pairs (none involve 'pets')
    from tests._smoke import smoke_study

    _, study, _ = smoke_study()
    code, out = _cli("rank-sources", "--target", "pets", "--target-model", str(tmp_path / "target.safetensors"),
                     "--sources", str(root / BACKBONE_ID / "vectors"), "--study", str(study), "--json", *store)
    assert code == 0, out
    ranking = json.loads(out)
    assert ranking["tier"] == 0 and ranking["n_training_pairs"] == 6
    assert all(s["risk_card"] is None for s in ranking["sources"]) and ranking["level"] == 0.8
    # one prediction per quantity, with its interval; an unpredictable one is the training mean, said once
    assert set(ranking["predictions"]) == {"ermse_norm", "acc_drop"}
    for q, d in ranking["predictions"].items():
        assert all((s[f"predicted_{q}"] is not None) == d["predictable"] for s in ranking["sources"])
        assert d["predictable"] or any("not predictable" in h for h in ranking["headline"])
    assert any(n.startswith("predictor: ridge fitted on 6") for n in ranking["notes"])

    # tier 1 with a suite whose pairs carry exact and diagonal risks (the smoke study has none: they are added
    # here, R_exact = 20·R_diag·e^(noise)): the card's R is calibrated to the exact risk with one scale
    import numpy as np

    from diag.decide.card_scale import fit_card_scale
    from diag.table import load_study, write_table

    table = load_study(study)
    rng = np.random.default_rng(0)
    table["risk_diag"] = rng.uniform(0.1, 1.0, len(table))
    table["risk_exact"] = 20.0 * table["risk_diag"] * np.exp(0.1 * rng.normal(size=len(table)))
    write_table(table, tmp_path / "risky" / "pairs.csv")
    code, out = _cli("rank-sources", "--target", "pets", "--target-model", str(tmp_path / "target.safetensors"),
                     "--card", str(card), "--sources", str(root / BACKBONE_ID / "vectors"), "--study",
                     str(tmp_path / "risky"), "--json", *store)
    assert code == 0, out
    ranking = json.loads(out)
    scale = fit_card_scale(load_study(tmp_path / "risky", lambda2=0.7))
    assert 15 < scale.scale < 25 and any(n.startswith("card risk calibrated") for n in ranking["notes"])
    for s in ranking["sources"]:
        assert s["risk_card_calibrated"] == pytest.approx(scale.apply(s["risk_diag"]), rel=1e-12)


def _refused(root, *argv) -> str:
    import contextlib
    import io

    before = _tree_hash(root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, _ = _cli(*argv, "--store", str(root), "--preset", "smoke", "--quiet")
    assert code == 2, err.getvalue()
    assert _tree_hash(root) == before
    return err.getvalue()


def test_refuses_pickled_module(world, tmp_path):
    root, _ = world
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    msg = _refused(root, "import", "--kind", "ft", "--domain", "gamma", "--input", str(tmp_path / "model.pt"))
    assert "weights_only=False" in msg and "save_file" in msg and len(msg.strip().splitlines()) == 1


def test_refuses_wrong_shapes(world, tmp_path):
    root, whole = world
    bad = _finetuned(whole, 6)
    bad["visual.proj"] = bad["visual.proj"][:, :-1].contiguous()
    save_file(bad, tmp_path / "bad.safetensors")
    msg = _refused(root, "import", "--kind", "ft", "--domain", "gamma", "--input", str(tmp_path / "bad.safetensors"))
    assert "visual.proj" in msg


def test_refuses_other_base(world, tmp_path):
    from train.backbones import create_backbone

    root, _ = world
    other = create_backbone(BACKBONE, seed=123).clip.state_dict()  # the smoke store's architecture, other weights
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "other.safetensors")
    msg = _refused(root, "import", "--kind", "ft", "--domain", "gamma", "--input", str(tmp_path / "other.safetensors"))
    assert "another base" in msg
    msg = _refused(root, "import", "--kind", "base", "--input", str(tmp_path / "other.safetensors"))
    assert "already holds base" in msg


def test_vit_b32_shapes_check():
    """ViT-B/32's tower passes the architecture check against itself (whole model or tower keys), not against the
    smoke backbone's."""
    from diag.bench.ranking import vit_b32_shapes
    from train.errors import BaseMismatchError
    from train.external_weights import check_architecture, visual_part

    shapes = vit_b32_shapes()
    assert 87_000_000 < sum(int(np.prod(s)) for s in shapes.values()) < 89_000_000
    base = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    tower = {k.removeprefix("visual."): v for k, v in base.items()}
    check_architecture(visual_part(tower), base, "vit.safetensors")
    small = {k: v for k, v in smoke_store().load_base()[0].clip.state_dict().items()}
    with pytest.raises(BaseMismatchError, match="does not match the store's backbone"):
        check_architecture(visual_part(small), base, "small.safetensors")


def test_bench_rank_small(tmp_path):
    """The bench writes its inputs once (content-keyed) and ranks the cached copy on the next run."""
    from diag.bench.ranking import bench_rank, cached_inputs, synthetic_shapes

    out = bench_rank(n_params=200_000, n_sources=2, k=1, cache=tmp_path)
    assert out["n_params"] == 199_680 and out["n_sources"] == 2
    assert 0 < out["seconds"] < out["process_seconds"] and 0 < out["import_seconds"] < out["process_seconds"]
    assert 0 < out["cpu_seconds"] and 0 < out["peak_rss_gb"] < 4
    assert set(out["what"]) >= {"seconds", "cpu_seconds", "import_seconds", "process_seconds"}
    again = bench_rank(n_params=200_000, n_sources=2, k=1, cache=tmp_path)
    assert again["inputs"] == out["inputs"] and again["inputs_written_seconds"] < out["inputs_written_seconds"]
    assert [p.name for p in tmp_path.iterdir()] == [Path(out["inputs"]).name]  # no partial folder left
    assert cached_inputs(synthetic_shapes(200_000), 3, 1, tmp_path) != Path(out["inputs"])


def test_import_base_into_empty_store(world, tmp_path):
    """`diag import --kind base` starts a store named by `--checkpoint BASE`; later imports and the zoo reuse it."""
    _, whole = world
    save_file({k: v.contiguous() for k, v in whole.items()}, tmp_path / "base.safetensors")
    save_file(_finetuned(whole, 7), tmp_path / "src_ft.safetensors")
    root = tmp_path / "fresh"
    opts = ["--backbone", BACKBONE, "--checkpoint", str(tmp_path / "base.safetensors"), "--store", str(root), "--quiet"]
    code, out = _cli("import", "--kind", "base", "--input", str(tmp_path / "base.safetensors"), "--json", *opts)
    assert code == 0, out
    rec = json.loads(out)
    assert rec["written"] and Path(rec["store"]) == root / f"{BACKBONE}-ckpt-base"
    code, out = _cli("import", "--kind", "ft", "--domain", "src", "--input", str(tmp_path / "src_ft.safetensors"),
                     "--json", *opts)
    assert code == 0 and json.loads(out)["base_hash"] == rec["base_hash"]
    from train.store import Store
    from train.zoo import Zoo, preset

    cfg = preset("default").__class__(backbone=BACKBONE, checkpoint=str(tmp_path / "base.safetensors"))
    assert Zoo(Store(root, f"{BACKBONE}-ckpt-base"), cfg, progress=False).base()[1] == rec["base_hash"]  # reused
    code, out = _cli("import", "--kind", "base", "--input", str(tmp_path / "base.safetensors"), "--json", *opts)
    assert code == 0 and json.loads(out)["written"] is False
    # a visual tower alone cannot be θ_base (the heads need its text tower): refused, nothing written
    save_file({k: v.contiguous() for k, v in whole.items() if k.startswith("visual.")}, tmp_path / "tower.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _refused(empty, "import", "--kind", "base", "--input", str(tmp_path / "tower.safetensors"))
    assert f"does not match backbone '{BACKBONE}'" in msg
    msg = _refused(empty, "import", "--kind", "base", "--input", str(tmp_path / "base.safetensors"),
                   "--checkpoint", str(tmp_path / "src_ft.safetensors"))
    assert "are different weights" in msg


def test_card_refuses_krylov_below_k(world, tmp_path):
    root, _ = world
    msg = _refused(root, "card", "--target", "pets", "--model", str(tmp_path / "m.safetensors"), "--out",
                   str(tmp_path / "card.safetensors"), "--k", "3", "--lanczos-iters", "2")
    assert "--lanczos-iters 2 is below --k 3" in msg
