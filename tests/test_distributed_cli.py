"""The ``diag`` CLI under torchrun with 2 gloo processes equals one process.

``diag zoo`` splits the domains over the ranks (θ_base by rank 0): every artifact is written
by exactly one process and is byte-identical to a one-process build (same seeds, one thread
in both, a byte-reproducible writer). ``diag study`` splits the pairs: the merged table equals
the one-process table in every column but the wall time. ``diag hessian`` all-reduces the
Hessian-vector products over the ranks' halves of the batches: the Hutchinson trace equals
the one-process value to float32 summation-order tolerance (the same probes; only the order
in which per-batch float32 products are added differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from diag.cli import main
from diag.runtime.distributed import process_group
from tests._smoke import BACKBONE_ID

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["gtsrb", "mnist"]
COMMON = ["--preset", "smoke", "--quiet", "--json"]
HESSIAN = ["hessian", "--domain", "gtsrb", "--n-images", "24", "--batch-size", "8", "--probes", "4"]
STUDY = ["study", "--domains", *DOMAINS, "--no-curvature"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _torchrun(store: Path, *args: str) -> dict:
    """``python -m torch.distributed.run --nproc_per_node 2 -m diag.cli ARGS`` (gloo, a free port); its JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "diag.cli", *args, "--store", str(store), *COMMON]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # only rank 0 prints: anything from rank 1 would break the JSON


def _single(store: Path, capsys, *args: str) -> dict:
    """The same command in this process (no process group), on one thread like each torchrun rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main([*args, "--store", str(store), *COMMON]) == 0
        return json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both stores: (torchrun outputs, store) and (one-process outputs, store); filled by the tests in order."""
    return {"dist": tmp_path_factory.mktemp("dist"), "single": tmp_path_factory.mktemp("single"),
            "workers": tmp_path_factory.mktemp("workers")}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def _stage_of(rel: Path) -> str:
    """The zoo stage (train.zoo.build.STAGES) that writes a store file."""
    return "phi" if rel.parts[0] == "attributions" else "ftx" if rel.name.startswith("ftx") else "ft"


def _check_stage_ranks(out: dict, folder: Path) -> None:
    """Every stage of every domain claimed by rank 0 or 1, each artifact written once, by its stage's rank."""
    assert set(out["stage_ranks"]) == set(DOMAINS)
    assert all(set(r) == {"ft", "phi", "ftx"} and set(r.values()) <= {0, 1} for r in out["stage_ranks"].values())
    written = [p for rank in out["built"] for p in rank]
    assert len(out["built"]) == 2 and len(written) == len(set(written))  # each artifact built exactly once
    assert set(written) == {str(p) for p in folder.rglob("*.safetensors")}
    for rank, paths in enumerate(out["built"]):
        for p in paths:
            rel = Path(p).relative_to(folder)
            if rel.name != "base.safetensors":
                owner = next(d for d in DOMAINS if d in str(rel))
                assert out["stage_ranks"][owner][_stage_of(rel)] == rank, p
    assert len(out["idle_seconds"]) == len(out["waited_seconds"]) == 2
    assert all(0 <= w <= i + 0.01 for w, i in zip(out["waited_seconds"], out["idle_seconds"]))


def test_zoo_sharded_by_domain_equals_one_process(runs, capsys):
    out = _torchrun(runs["dist"], "zoo", "--domains", *DOMAINS)
    ref = _single(runs["single"], capsys, "zoo", "--domains", *DOMAINS)
    folder = Path(out["store"])
    _check_stage_ranks(out, folder)
    assert str(folder / "base.safetensors") in out["built"][0]
    dist_files, single_files = _files(folder), _files(Path(ref["store"]))
    assert sorted(dist_files) == sorted(single_files) and len(dist_files) == 1 + 4 * len(DOMAINS)
    for name, data in dist_files.items():
        assert data == single_files[name], f"{name} differs from the one-process build"
    assert out["zero_shot_accuracy"] == ref["zero_shot_accuracy"]


def test_study_sharded_by_pair_equals_one_process(runs, capsys):
    out = _torchrun(runs["dist"], *STUDY)
    ref = _single(runs["single"], capsys, *STUDY)
    assert out["n_rows"] == ref["n_rows"] == 2 and out["shard"] == [0, 1]
    study = Path(out["study"])
    shards = [pd.read_csv(study / f"pairs-shard{r}of2.csv") for r in range(2) if (study / f"pairs-shard{r}of2.csv").is_file()]
    assert sum(len(s) for s in shards) == 2  # each pair claimed by one rank (which one is up to the queue)
    a, b = (pd.read_csv(Path(o["study"]) / "pairs.csv").sort_values(["source", "target"]).reset_index(drop=True)
            for o in (out, ref))
    assert list(a.columns) == list(b.columns)
    cols = [c for c in a.columns if c != "seconds"]  # wall time is the only column allowed to differ
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)


def test_hessian_trace_all_reduced_equals_one_process(runs, capsys):
    out = _torchrun(runs["dist"], *HESSIAN)
    ref = _single(runs["single"], capsys, *HESSIAN)
    assert out["dim"] == ref["dim"] and out["trace"]["n_probes"] == ref["trace"]["n_probes"] == 4
    for key in ("trace", "hutchpp"):
        for field in ("value", "stderr"):
            assert out[key][field] == pytest.approx(ref[key][field], rel=1e-5), (key, field)


def _curvature_worker(rank: int, init_file: str, store_root: str, out_dir: str) -> None:
    """One rank of the study's curvature step: its targets' Hᵀ into the store, then every target's card read."""
    from diag.runtime.context import Context
    from diag.features.pair_features import Diagnostics
    from diag.runtime.shards import build_curvatures

    torch.set_num_threads(1)
    with process_group(f"file://{init_file}", rank=rank, world_size=2, backend="gloo"):
        diag = Diagnostics(Context(Path(store_root), preset="smoke").workspace(), settings=_curvature_settings(),
                           data_parallel=False)
        mine = build_curvatures(diag, DOMAINS)
        fresh = [diag.store.is_fresh(diag.diag_path(t), diag._curvature_key(t)) for t in DOMAINS]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"mine": mine, "fresh": fresh}))


def _curvature_settings():
    from diag.features.pair_features import CurvatureSettings

    return CurvatureSettings(n_images=8, batch_size=8, probes=2, k=1, params=("visual.transformer.resblocks.0.mlp.*",))


def test_study_curvature_one_rank_per_target_equals_one_process(runs, tmp_path):
    """Before the study splits its pairs, each target's Hᵀ is computed by one rank alone, as one process would."""
    import torch.multiprocessing as mp

    from diag.runtime.context import Context
    from diag.features.pair_features import Diagnostics

    settings = _curvature_settings()
    mp.spawn(_curvature_worker, args=(str(tmp_path / "init"), str(runs["dist"]), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(t for r in ranks for t in r["mine"]) == sorted(DOMAINS)  # each target claimed by one rank
    assert all(r["fresh"] == [True, True] for r in ranks)  # after the barrier every rank reads every card
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Diagnostics(Context(runs["single"], preset="smoke").workspace(), settings=settings)
        for t in DOMAINS:
            ref.curvature(t)
    finally:
        torch.set_num_threads(threads)
    dist_ws = Diagnostics(Context(runs["dist"], preset="smoke").workspace(), settings=settings)
    for t in DOMAINS:
        for path in (dist_ws.card_path(t), dist_ws.diag_path(t)):
            other = runs["single"] / path.relative_to(runs["dist"])
            assert path.read_bytes() == other.read_bytes(), f"{path.name} of {t} differs from one process"


def test_zoo_in_local_workers_equals_one_process(runs, capsys):
    """``--workers 2`` (spawned gloo processes, no torchrun) writes the one-process artifacts, byte for byte."""
    out = _single(runs["workers"], capsys, "zoo", "--domains", *DOMAINS, "--workers", "2")
    assert out["workers"] == 2
    _check_stage_ranks(out, Path(out["store"]))
    assert len([p for rank in out["built"] for p in rank]) == 1 + 4 * len(DOMAINS)
    assert str(Path(out["store"]) / "base.safetensors") in out["built"][0]  # built by this process, before the split
    mine = _files(Path(out["store"]))
    single = {k: v for k, v in _files(runs["single"] / BACKBONE_ID).items()
              if not k.startswith("curvature")}  # the earlier curvature tests also wrote into that store
    assert sorted(mine) == sorted(single)
    for name, data in mine.items():
        assert data == single[name], f"{name} differs from the one-process build"
    again = _single(runs["workers"], capsys, "zoo", "--domains", *DOMAINS, "--workers", "2")
    assert again["workers"] == 1 and again["built"] == [[]]  # nothing left: no workers are started


def test_study_in_local_workers_equals_one_process(runs, capsys):
    out = _single(runs["workers"], capsys, *STUDY, "--workers", "2")
    study = Path(out["study"])
    assert sorted(p.name for p in study.glob("pairs-shard*of2.csv")) == ["pairs-shard0of2.csv", "pairs-shard1of2.csv"]
    a, b = (pd.read_csv(Path(f) / "pairs.csv").sort_values(["source", "target"]).reset_index(drop=True)
            for f in (study, runs["single"] / BACKBONE_ID / "studies" / "allpairs"))
    cols = [c for c in a.columns if c != "seconds"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
