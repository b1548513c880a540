"""ViT-B/32 end to end on CPU, through the CLI: a random-weight open_clip ViT-B-32 checkpoint saved here,
two ImageFolder domains of real images (the vendored mini-suite's, upsampled to 224 px), and the chain
zoo → transfer (IoU@1/5/10 at M = 49) → curvature → study → rank-sources on the ``vitb-smoke`` preset.
ViT-L-14 is shape-checked on the meta device, without weights."""

import contextlib
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from diag.cli import main
from tests._smoke import one_thread

M = 49  # 224 px / 32 px patches, squared
DOMAINS = {"alpha": ("gtsrb", (1, 2)), "beta": ("cifar10", (0, 1))}


def _cli(*argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--json"])
    assert code == 0, out.getvalue()[-2000:]
    return json.loads(out.getvalue())


def _image_folders(root: Path) -> dict[str, Path]:
    """``<root>/<domain>/{train,test}/<class>/*.png``: 8 train and 2 test images of two classes per domain."""
    from PIL import Image

    data = Path(__file__).resolve().parent.parent / "data" / "minisuite"
    for domain, (npz, classes) in DOMAINS.items():
        arrays = np.load(data / f"{npz}.npz")
        for split, n in (("train", 8), ("test", 2)):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            for c in classes:
                folder = root / domain / split / f"class{c}"
                folder.mkdir(parents=True)
                for i in np.flatnonzero(y == c)[:n]:
                    Image.fromarray(x[i].squeeze()).save(folder / f"{i}.png")
    return {d: root / d for d in DOMAINS}


def _target_checkpoint(store: Path, path: Path) -> Path:
    """θ_ft of beta = θ_base + τ_ft as a visual-tower state dict: a target owner's fine-tuned model."""
    from safetensors.torch import save_file

    from train.store import Store, base_state

    st = Store(store.parent, store.name)
    backbone, base_hash = st.load_base()
    theta = st.load_vector("beta", "ft").apply_to(base_state(backbone), base_hash=base_hash)
    save_file({k.removeprefix("visual."): v.contiguous() for k, v in theta.items()}, path)
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The whole chain once; returns (store folder, the commands' JSON outputs, study folder)."""
    from safetensors.torch import save_file

    from train.backbones import create_backbone

    root = tmp_path_factory.mktemp("vitb")
    clip = create_backbone("ViT-B-32", seed=0).clip
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, root / "base.safetensors")
    del clip
    folders = _image_folders(root / "data")
    common = ["--backbone", "ViT-B-32", "--checkpoint", str(root / "base.safetensors"), "--preset", "vitb-smoke",
              "--store", str(root / "store"), "--quiet", *[f"--data={d}={p}" for d, p in folders.items()]]
    out, cpu = {}, time.process_time()
    with one_thread():
        out["zoo"] = _cli("zoo", "--domains", *DOMAINS, *common)
        out["transfer"] = _cli("transfer", "--source", "alpha", "--target", "beta", "--domains", *DOMAINS, *common)
        out["hessian"] = _cli("hessian", "--domain", "beta", "--what", "diag", "--probes", "2", "--n-images", "2",
                              "--batch-size", "2", "--params", "visual.transformer.resblocks.11.*", *common)
        out["study"] = _cli("study", "--domains", *DOMAINS, "--no-curvature", "--no-controls",
                            "--out", str(root / "study"), *common)
        # two domains make no known pair without the target to fit a predictor on: the open-world ranking,
        # for beta's θ_ft as a prediction-only checkpoint, over the store's vectors (ranked by the proxy)
        target = _target_checkpoint(Path(out["zoo"]["store"]), root / "beta_ft.safetensors")
        out["rank"] = _cli("rank-sources", "--target", "beta", "--target-model", str(target), "--sources",
                           str(Path(out["zoo"]["store"]) / "vectors"), "--study", str(root / "study"), *common)
        out["cpu_s"] = time.process_time() - cpu
    yield Path(out["zoo"]["store"]), out, root / "study"
    shutil.rmtree(root, ignore_errors=True)  # ~3 GB of weights and vectors


def test_zoo_store_contents(chain):
    from train.tensorio import load_tensors, read_metadata

    store, out, _ = chain
    assert store.name == "ViT-B-32-ckpt-base-vitb-smoke"
    assert read_metadata(store / "base.safetensors")["backbone"] == "ViT-B-32"
    for d in DOMAINS:
        for name in (f"heads/{d}", f"vectors/{d}/ft", f"vectors/{d}/ftx-a0.8", f"attributions/{d}-kernelshap"):
            assert (store / f"{name}.safetensors").is_file(), name
        phi, meta = load_tensors(store / "attributions" / f"{d}-kernelshap.safetensors")
        # the preset's prefixes: 4 train, 2 val, 2 test images; φ over the 7 × 7 patch grid
        assert {s: tuple(phi[s].shape) for s in ("train", "val", "test")} == {"train": (4, M), "val": (2, M),
                                                                              "test": (2, M)}
        assert torch.isfinite(phi["train"]).all() and meta["samples"] == "4"
        ft, ftx = (load_tensors(store / "vectors" / d / f"{k}.safetensors")[0] for k in ("ft", "ftx-a0.8"))
        assert 87_000_000 < sum(v.numel() for v in ft.values()) < 89_000_000  # the whole vision tower
        assert any(not torch.equal(ft[k], ftx[k]) for k in ft)  # α < 1 moved θ_ft* away from θ_ft
    assert set(out["zoo"]["zero_shot_accuracy"]) == set(DOMAINS)


def test_transfer_metrics_at_m49(chain):
    _, out, _ = chain
    rows = {r["model"]: r for r in out["transfer"]["rows"]}
    assert {"proposed", "θ_ftᵀ"} <= set(rows) and any(m.startswith("control") for m in rows)
    for row in rows.values():
        assert row["ks"] == [1, 5, 10] and row["n"] == 2  # the preprint's K at M = 49: no rescaling
        assert all(math.isfinite(row[k]) for k in ("accuracy", "ermse", "kendall", "iou1", "iou5", "iou10"))
        assert row["iou_chance"][0] == pytest.approx(1 / M)


def test_curvature_diag(chain):
    store, out, _ = chain
    h = out["hessian"]
    assert h["dim"] == 7_087_872  # one ViT-B/32 block: 12·768² + 2·768·3072 + biases and norms
    assert math.isfinite(h["diag"]["total"]) and h["diag"]["n_probes"] == 2
    assert Path(h["path"]).is_file() and Path(h["path"]).is_relative_to(store / "curvature" / "beta")


def test_study_and_rank(chain):
    _, out, study = chain
    pairs = pd.read_csv(study / "pairs.csv")
    assert sorted(zip(pairs["source"], pairs["target"])) == [("alpha", "beta"), ("beta", "alpha")]
    assert np.isfinite(pairs["cos_ft"]).all()
    rank = out["rank"]
    # beta's own τ_ft is the target's: cos = 1, ranked first; alpha's cosine is a finite number below it
    assert rank["tier"] == 0 and [s["source"] for s in rank["sources"]] == ["beta", "alpha"]
    assert rank["sources"][0]["cos_ft"] == pytest.approx(1.0, abs=1e-6)
    assert math.isfinite(rank["sources"][1]["cos_ft"]) and rank["sources"][1]["cos_ft"] < 0.999
    print(f"ViT-B/32 chain: {out['cpu_s']:.0f} s of CPU time")


def test_vit_l14_shapes_without_weights():
    """ViT-L/14: a 16 × 16 grid at 224 px, a 304M-parameter tower; layout, blocks and import checks accept it."""
    from diag.curvature.params import layout_for, select_params
    from diag.features.similarity import block_group
    from train.backbones import build_clip, load_config
    from train.external_weights import check_architecture, visual_part

    cfg = load_config("ViT-L-14")
    assert (cfg.image_size, cfg.patch_size, cfg.num_patches) == (224, 14, 256)
    with torch.device("meta"):
        visual = build_clip(cfg).visual
    n = sum(p.numel() for p in visual.parameters())
    assert 303_000_000 < n < 305_000_000
    layout = layout_for(visual, select_params(visual))
    assert layout.dim == n
    groups = {block_group(f"visual.{k}") for k in layout.names}
    assert groups == {"embed", "head", *(f"block.{i}" for i in range(24))}
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    check_architecture(visual_part({k.removeprefix("visual."): v for k, v in state.items()}), state, "vitl.pt")
