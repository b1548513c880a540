"""The from-ft variant's α = 1 twin: its build, τ* against it, keys of the paper variant unchanged, equal norm."""

import hashlib
import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train.zoo.build as zoo_build
from tests._smoke import BACKBONE_ID, one_thread, smoke_store
from diag.runtime.context import Workspace
from diag.study.run import run_study, StudySettings
from diag.table import pair_key
from train.errors import ArtifactError
from train.loop import OptimConfig
from train.store import Store
from train.vectors import TaskVector
from train.zoo import preset, Zoo

ROOT = Path(__file__).resolve().parents[1]
#: three from-ft steps: the continuation moves θ_ft, and the α = 1 twin moves it elsewhere than α = 0.8
CFG = replace(preset("smoke"), from_ft=OptimConfig(steps=3, lr=3e-3, warmup=1, batch_size=16))


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture()
def copy_store(tmp_path):
    shutil.copytree(smoke_store().root, tmp_path / "store")
    return Store(tmp_path / "store", BACKBONE_ID)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def equal(a: TaskVector, b: TaskVector) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_twin_is_the_same_continuation_at_alpha_one(copy_store, monkeypatch):
    """The twin and θ_ft* of from-ft start at θ_ft, see the same batches with the same optimiser; only α differs."""
    runs, plans = [], []
    real_fit, real_loss, real_plan = zoo_build.fit, zoo_build.alpha_loss, zoo_build.batch_plan

    def spy_plan(*args, **kw):
        plans.append(real_plan(*args, **kw))
        return plans[-1]

    def spy_fit(params, step_loss, optim, **kw):
        params = list(params)
        runs.append({"start": [p.detach().clone() for p in params if p.requires_grad], "optim": optim, "alphas": set()})
        return real_fit(params, step_loss, optim, **kw)

    def spy_loss(logits, phi, labels, phi_true, alpha):
        runs[-1]["alphas"].add(alpha)
        return real_loss(logits, phi, labels, phi_true, alpha)
    for name, spy in (("fit", spy_fit), ("alpha_loss", spy_loss), ("batch_plan", spy_plan)):
        monkeypatch.setattr(zoo_build, name, spy)
    zoo = Zoo(copy_store, CFG, progress=False)
    zoo.build(["mnist"], variants=("from-ft",))  # θ_ft and φ reused from the smoke store; θ_ft* and the twin built
    (ftx, twin), (plan_ftx, plan_twin) = runs[-2:], plans[-2:]
    assert (ftx["alphas"], twin["alphas"]) == ({0.8}, {1.0})
    assert ftx["optim"] == twin["optim"] == CFG.from_ft
    theta_ft = zoo.model("mnist", zoo.ft("mnist").apply_to(zoo_build.base_state(zoo.base()[0]),
                                                           base_hash=zoo.base()[1]))
    start = [p.detach() for p in theta_ft.visual.parameters() if p.requires_grad]
    assert len(start) == len(ftx["start"]) == len(twin["start"])
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(start, ftx["start"], twin["start"]))
    assert len(plan_ftx) == CFG.from_ft.steps
    assert all(torch.equal(a.index, b.index) for a, b in zip(plan_ftx, plan_twin))
    stored = copy_store.load_vector("mnist", "ftx", 1.0, variant="from-ft")
    meta = stored.provenance
    assert copy_store.reference_path("mnist", variant="from-ft").name == "ftx-a1-fromft.safetensors"
    assert (meta["init"], meta["alpha"], meta["steps"], meta["supervision"]) == ("θ_ft", "1.0", "3", "none")
    assert meta["role"].startswith("twin")
    ft, star_ftx = copy_store.load_vector("mnist", "ft"), copy_store.load_vector("mnist", "ftx", 0.8, variant="from-ft")
    assert not equal(stored, ft) and not equal(stored, star_ftx)  # it moved, and α matters
    monkeypatch.undo()
    assert equal(Zoo(copy_store, CFG, progress=False).train_ftx("mnist", 1.0, "from-ft"), stored)  # deterministic


def test_star_of_from_ft_is_ftx_minus_twin_exactly(copy_store):
    Zoo(copy_store, CFG, progress=False).build(["mnist", "gtsrb"], variants=("from-ft",))
    ftx = copy_store.load_vector("mnist", "ftx", 0.8, variant="from-ft")
    twin = copy_store.load_vector("mnist", "ftx", 1.0, variant="from-ft")
    ft = copy_store.load_vector("mnist", "ft")
    star, raw = (copy_store.explainability_vector("mnist", 0.8, variant=v) for v in ("from-ft", "from-ft-raw"))
    assert equal(star, ftx - twin) and equal(raw, ftx - ft) and not equal(star, raw)
    ws = Workspace(copy_store, 0.8, variant="from-ft")
    assert equal(ws.vector("mnist", "star"), star) and equal(ws.vector("mnist", "ref"), twin)
    assert equal(ws.for_run(variant="from-ft-raw").vector("mnist", "star"), raw)
    assert equal(ws.for_run(variant="paper").vector("mnist", "star"), copy_store.explainability_vector("mnist", 0.8))
    # both from-ft forms read the one θ_ft* file; the study refuses a from-ft run without its twin
    assert ws.vector_path("mnist", "ftx") == ws.for_run(variant="from-ft-raw").vector_path("mnist", "ftx")
    copy_store.reference_path("gtsrb", variant="from-ft").unlink()
    with pytest.raises(ArtifactError, match="ftx-a1-fromft"):
        run_study(copy_store, ["mnist", "gtsrb"], StudySettings(curvature=False, variant="from-ft", controls=False),
                  out_dir=copy_store.study_dir("twin"), progress=False)


class _KeysOnly(Zoo):
    """A zoo whose θ_base and data are stand-ins: its content keys, computed without training anything."""

    def base(self):
        return None, "b" * 16

    def domain(self, name):
        return SimpleNamespace(content_hash="d" * 16, data_key="d" * 16, split_key="", classnames=("zero", "one"),
                               templates=("a photo of {}.",))


#: keys of the smoke preset's artifacts on stand-in inputs, computed by the code before the twin existed:
#: the paper variant (and θ_ft* of from-ft) keep them, so existing stores keep every file.
KEYS_BEFORE = {"head": "49ad6b9edf442fc4", "ft": "313f8a27df2d3460", "attributions": "315dbf714f3b9676",
               "ftx-a0.8": "f52253045f80a40e", "ftx-a0.8-fromft": "9aa19aae81fc5e1e"}
PAIR_KEY_BEFORE = "9b728bc3cddb4d93"


def test_keys_of_existing_artifacts_are_unchanged(tmp_path):
    zoo = _KeysOnly(Store(tmp_path, BACKBONE_ID), preset("smoke"), progress=False)
    plan = zoo.plan("mnist", variants=("paper", "from-ft"))
    assert {k: v.key for k, v in plan.items() if k != "ftx-a1-fromft"} == KEYS_BEFORE
    assert set(plan) == {*KEYS_BEFORE, "ftx-a1-fromft"}  # the twin is planned with from-ft
    assert set(zoo.plan("mnist", variants=("paper",))) == set(KEYS_BEFORE) - {"ftx-a0.8-fromft"}
    assert set(zoo.plan("mnist", variants=("from-ft-raw",))) == set(KEYS_BEFORE) - {"ftx-a0.8"}  # no twin needed
    settings = {"alpha": 0.8, "seed": 0, "variant": "paper"}
    assert pair_key(zoo.store, "mnist", "gtsrb", settings, "b" * 16) == PAIR_KEY_BEFORE
    twin = pair_key(zoo.store, "mnist", "gtsrb", {**settings, "variant": "from-ft"}, "b" * 16)
    raw = pair_key(zoo.store, "mnist", "gtsrb", {**settings, "variant": "from-ft-raw"}, "b" * 16)
    assert len({twin, raw, PAIR_KEY_BEFORE}) == 3


def test_paper_files_are_byte_identical_after_building_from_ft(copy_store):
    paper = [copy_store.vector_path(d, k, 0.8) for d in ("mnist", "gtsrb") for k in ("ft", "ftx")]
    before = {p: sha(p) for p in paper}
    Zoo(copy_store, CFG, progress=False).build(["mnist", "gtsrb"], variants=("paper", "from-ft"))
    assert {p: sha(p) for p in paper} == before


def test_matched_lambda2_gives_the_paper_norm(copy_store):
    spec = importlib.util.spec_from_file_location("equal_norm", ROOT / "scripts" / "equal_norm.py")
    equal_norm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(equal_norm)
    Zoo(copy_store, CFG, progress=False).build(["mnist", "gtsrb"], variants=("from-ft",))
    paper = Workspace(copy_store, 0.8)
    for variant in ("from-ft", "from-ft-raw"):
        ws = paper.for_run(variant=variant)
        lam = equal_norm.matched_lambda2(paper, ws, "mnist", 0.7)
        assert (lam * ws.vector("mnist", "star")).norm() == pytest.approx(0.7 * paper.vector("mnist", "star").norm(),
                                                                          rel=1e-6)
    df = equal_norm.score_forms(paper, ["from-ft"], ["mnist", "gtsrb"], 0.7, controls=False)
    assert sorted(df["form"].unique()) == ["from-ft@0.7", "from-ft@norm", "paper@0.7"]
    steps = df.groupby(["source", "form"])["norm_step"].first().unstack()
    assert steps["from-ft@norm"].to_numpy() == pytest.approx(steps["paper@0.7"].to_numpy(), rel=1e-6)
    summary = equal_norm.summarize_forms(df, n_boot=50)
    assert summary["from-ft@norm"]["n_pairs"] == 2 and "minus_paper" in summary["from-ft@norm"]
