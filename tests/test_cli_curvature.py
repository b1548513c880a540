"""`diag hessian`, `diag spectrum`, `diag risk` through main([...]) on the smoke store."""

import json

import math

import pytest
import torch

from diag.cli import main
from tests._smoke import smoke_store

SMALL = ["--n-images", "32", "--batch-size", "16", "--engine", "double-backward", "--quiet", "--preset", "smoke"]


@pytest.fixture(scope="module")
def root():
    return str(smoke_store().root)


def run_json(capsys, *argv):
    code = main(list(argv) + ["--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_hessian_trace_and_resume(root, capsys):
    res = run_json(capsys, "hessian", "--domain", "mnist", "--what", "trace", "--probes", "6", "--store", root, *SMALL)
    t = res["trace"]
    assert t["n_matvecs"] == 6 and t["stderr"] > 0 and t["ci95_low"] < t["value"] < t["ci95_high"]
    # same seed and probes with checkpointing gives the same number
    res2 = run_json(capsys, "hessian", "--domain", "mnist", "--what", "trace", "--probes", "6", "--resume",
                    "--store", root, *SMALL)
    assert res2["trace"]["value"] == pytest.approx(t["value"], rel=1e-10)


def test_hessian_diagonal_totals(root, capsys):
    res = run_json(capsys, "hessian", "--domain", "animals", "--what", "diag", "--probes", "4", "--store", root, *SMALL)
    d = res["diag"]
    assert d["n_matvecs"] == 4 and d["total_stderr"] > 0
    from train.tensorio import load_tensors

    diag = load_tensors(res["path"])[0]["diag"]
    assert float(diag.sum()) == pytest.approx(d["total"], rel=1e-9)
    top = list(res["per_tensor_top"].items())
    assert len(top) == 8 and all(name.startswith("visual.") for name, _ in top)
    mags = [abs(v) for _, v in top]
    assert mags == sorted(mags, reverse=True) and mags[0] <= float(diag.abs().sum()) + 1e-9


def test_risk_exact_matches_direct_double_backward(root, capsys):
    res = run_json(capsys, "risk", "--source", "animals", "--target", "mnist", "--probes", "4", "--k", "2",
                   "--check", "0.5", "--store", root, *SMALL)
    for key in ("risk_exact", "risk_card", "risk_diag", "risk_diag_se", "quadratic_check", "eigvals"):
        assert key in res
    check = res["quadratic_check"][0]
    assert check["measured_se"] > 0 and check["g_tau_se"] > 0
    assert min(check["measured_half_a"], check["measured_half_b"]) <= check["measured"] <= max(
        check["measured_half_a"], check["measured_half_b"])  # the mean of two halves of near-equal size
    assert main(["risk", "--source", "animals", "--target", "mnist", "--probes", "4", "--k", "2", "--check", "0.5",
                 "--store", root, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "± paired se" in printed and "logit-space model" in printed
    assert check["logit_predicted_se"] > 0 and math.isfinite(check["logit_predicted"])
    assert check["estimate_measured"] != check["measured"]  # g, H and the models on train images, scored on val
    assert 0 < res["risk_diag_se"] < float("inf") and "risk_diag_se" not in res["predicted_loss_increase"]
    # pair_features writes the same numbers as columns (the study's and rank-sources' one feature function)
    from diag.runtime.context import Workspace
    from diag.features.pair_features import CurvatureSettings, Diagnostics

    diag = Diagnostics(Workspace(smoke_store(), 0.8), 0.8, CurvatureSettings(
        n_images=32, batch_size=16, probes=4, k=2, engine="double-backward"))
    feats = diag.pair("animals", "mnist", exact=False).values
    assert feats["risk_diag"] == pytest.approx(res["risk_diag"], rel=1e-9)
    assert feats["risk_diag_se"] == pytest.approx(res["risk_diag_se"], rel=1e-6)
    assert len(res["eigvals"]) == 2 and res["eigvals"][0] >= res["eigvals"][1]
    # independent reference: τᵀ H τ by plain autograd on the same 32 images
    from train.datasets.pixels import to_model_input
    from train.datasets import load_domain
    from train.store import base_state

    store = smoke_store()
    backbone, bh = store.load_base()
    base = base_state(backbone)
    state = store.load_vector("mnist", "ft", expect_base=bh).apply_to(base, base_hash=bh)
    model = store.model("mnist", state, backbone=backbone)
    tau = store.explainability_vector("animals", 0.8, bh)
    part = load_domain("mnist").split("train")
    x = to_model_input(part.images[:32], backbone.config.mean, backbone.config.std)
    y = part.labels[:32].long()
    params = dict(model.visual.named_parameters())
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        names = [n for n in params if f"visual.{n}" in tau.tensors]
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        gv = sum((g * tau.tensors[f"visual.{n}"]).sum() for g, n in zip(grads, names))
        hv = torch.autograd.grad(gv, [params[n] for n in names])
    direct = sum(float((h.double() * tau.tensors[f"visual.{n}"].double()).sum()) for h, n in zip(hv, names))
    assert res["risk_exact"] == pytest.approx(direct, rel=1e-3, abs=1e-6)


def test_spectrum_writes_plot(root, capsys, tmp_path):
    png = tmp_path / "spec.png"
    res = run_json(capsys, "spectrum", "--domain", "animals", "--k", "2", "--probes", "2", "--iters", "6",
                   "--out", str(png), "--store", root, *SMALL)
    assert png.stat().st_size > 1000
    assert len(res["top"]["eigvals"]) == 2


def test_bench_curvature_quick_runs_every_path(capsys, root):
    """`diag bench curvature` on the tiny model: products, PyHessian, curvlinops and the estimators; with
    --domain the estimators also on the store's trained θ_ft of that domain (a row of its own)."""
    rows = run_json(capsys, "bench", "curvature", "--quick", "--models", "tiny-vit", "--repeats", "1", "--probes", "3",
                    "--domain", "gtsrb", "--store", root, "--preset", "smoke", "--quiet")
    r, trained = rows
    assert trained["model"] == "θ_ft gtsrb" and trained["batch"] <= 64 and trained["eig_s"] > 0
    assert trained["eig_reached_rounds"] == sum(e <= 1e-3 for e in trained["eig_rel_err"])
    assert r["n_params"] == 828672 and r["batch"] == 16
    for key in ("grad_s", "hvp_s", "hvp_kept_graph_s", "block8_per_probe_s", "trace_s", "hutchpp_s", "eig_s"):
        assert r[key] > 0, key
    assert r["est_probes"] == 3 and min(r["eig_matvecs"] + r["eig_gradient_start_matvecs"]) >= 2
    assert r["eig_accuracy"] == 1e-3 and r["eig_reached_rounds"] == sum(e <= 1e-3 for e in r["eig_rel_err"])
    assert r["trace_time_to_rel_se_s"] == pytest.approx(  # 1 % relative se, extrapolated as variance ∝ 1/products
        r["trace_s"] * (r["trace_stderr"] / (0.01 * abs(r["trace"]))) ** 2)
    if r.get("pyhessian_eig_own_rule_matvecs") is not None:  # time to accuracy: one reference, products counted
        assert len(r["pyhessian_eig_own_rule_rel_err"]) == len(r["eig_rel_err"]) == 1
        assert r["pyhessian_eig_own_rule_matvecs"][0] >= 2
        (tta,), (n,) = r["pyhessian_eig_time_to_accuracy_s"], r["pyhessian_eig_matvecs"]
        if tta is not None:  # reached within maxIter: no later than its 100 products, the ratio read from it
            assert 0 < tta and 1 <= n <= 100
            assert r["pyhessian_over_ours_eig"] == pytest.approx(tta / r["eig_s"])
    if r.get("pyhessian_top_eig") is not None:  # the same top eigenvalue by Lanczos and by power iteration
        assert r["top_eig"] == pytest.approx(r["pyhessian_top_eig"], rel=2e-2)
    assert set(r["goals"]) >= {"hvp_over_grad", "hvp_kept_over_grad", "pyhessian_over_ours_trace"}
    from diag.bench.curvature import RATIOS

    assert set(r["ratios"]) == set(RATIOS) and r["threads"] >= 1 and r["block8_batched_per_probe_s"] > 0
    assert r["ratios"]["block8_over_grad"] == pytest.approx(
        min(r["block8_per_probe_s"], r["block8_batched_per_probe_s"]) / r["grad_s"])
    if r.get("pyhessian_trace_s") is not None:  # 3 products: one Hutch++ probe, no stderr, no equal-accuracy ratio
        assert r["ratios"]["pyhessian_over_ours_trace_equal_accuracy"] is None
    from diag.bench.curvature import _build
    from diag.bench.estimators import bench_estimators

    model, x, y, params, _ = _build("tiny-vit", True, torch.device("cpu"))
    r = bench_estimators(model, x[:4], y[:4], params, [n for n, _ in model.named_parameters()], 6,
                         torch.device("cpu"), repeats=1)
    if r.get("pyhessian_trace_s") is not None:  # equal accuracy: Hutch++'s time scaled by its variance ratio
        want = r["pyhessian_trace_s"] / r["hutchpp_s"] * (r["pyhessian_trace_stderr"] / r["hutchpp_stderr"]) ** 2
        assert r["pyhessian_over_ours_trace_equal_accuracy"] == pytest.approx(want)


def test_power_iteration_record_read_as_time_to_accuracy_and_own_rule():
    """The oracle stop is the first step from which every estimate stays within the accuracy (a step that
    dips back out does not count); PyHessian's own rule stops at the first small change, returning the
    previous estimate; a record that ends outside the accuracy never reached it."""
    from diag.bench.estimators import own_rule_stop, time_to_accuracy

    run = {"start": 1.0, "steps": [(2.0, 50.0), (3.0, 99.95), (4.0, 98.0), (5.0, 99.93), (6.0, 99.99)]}
    assert time_to_accuracy(run, 100.0, 1e-3) == (4.0, 4)  # step 2 is within 1e-3 but step 3 is not
    assert time_to_accuracy(run, 100.0, 1e-5) == (None, None)
    assert own_rule_stop(run, tol=1e-3) == (5.0, 5, 99.93)  # |99.99 − 99.93| / 99.93 < 1e-3 first at step 5
    assert own_rule_stop(run, tol=1e-9) == (5.0, 5, 99.99)  # never: its last estimate after all products


def test_bench_estimators_refuses_one_probe():
    """One probe has no standard error: refused by name before any product."""
    from diag.bench.estimators import bench_estimators
    from train.errors import TvdiagError

    with pytest.raises(TvdiagError, match="--probes 1: .*at least 2"):
        bench_estimators(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), [], [], 1,
                         torch.device("cpu"))


def test_target_diagonal_keeps_statistics_not_probes(root):
    """The cached diagonal of Hᵀ holds (D,) statistics and (n, S) per-probe risks, no (n, D) tensor; a source
    added later replays the probes and gets bit for bit the column a build with it gives; --keep-probes keeps
    the per-probe diagonals (same se to float32); a diagonal file of the earlier format still loads."""
    from diag.curvature import HessianCard, probe_risks, risk_diagonal_stderr
    from diag.features.pair_features import CurvatureSettings, Diagnostics
    from diag.runtime.context import Workspace
    from train.tensorio import load_tensors, save_tensors

    settings = CurvatureSettings(n_images=16, batch_size=16, probes=3, k=2, seed=11, engine="double-backward",
                                 card_form="eig")
    ws = Workspace(smoke_store(), 0.8)
    late = Diagnostics(ws, settings=settings, sources=["mnist"])
    path = late.diag_path("gtsrb")
    path.unlink(missing_ok=True)
    # this test is about the diagonal file: a card of the right key made by hand spares the Lanczos run
    op = late.operator("gtsrb")
    D = op.shape[0]
    HessianCard(torch.ones(2, dtype=torch.float64), torch.eye(D, 2, dtype=torch.float64),
                torch.zeros(D, dtype=torch.float64), op.param_names, op.param_shapes,
                provenance={"key": late._curvature_key("gtsrb")}).save(late.card_path("gtsrb"))
    late.curvature("gtsrb")
    tensors, meta = load_tensors(path)
    assert set(tensors) == {"diag", "probe_risks"} and tuple(tensors["probe_risks"].shape) == (3, 1)
    assert tensors["diag"].dtype == torch.float32  # a noisy estimate, kept in float32
    assert all(t.numel() < 3 * D for t in tensors.values())  # no probes × D tensor by default
    assert json.loads(meta["risk_sources"])[0][0] == "mnist" and meta["seed"] == "11" and meta["block_size"] == "8"
    replayed = late.pair("animals", "gtsrb", exact=False).values["risk_diag_se"]
    late_tensors, late_meta = load_tensors(path)
    late_cols = late_tensors["probe_risks"]
    assert tuple(late_cols.shape) == (3, 2)

    def column(cols, meta, source):  # a source's per-probe risks, found by name (columns follow risk_sources)
        return cols[:, [name for name, _ in json.loads(meta["risk_sources"])].index(source)]

    path.unlink()
    kept = Diagnostics(ws, settings=settings, keep_probes=True)  # every source of the store, from the start
    # the shared smoke store holds animals and mnist, and any domain an earlier test of this process built
    everyone = kept.risk_sources("gtsrb")
    assert {"animals", "mnist"} <= set(everyone) and everyone == sorted(everyone) and "gtsrb" not in everyone
    assert kept.pair("animals", "gtsrb", exact=False).values["risk_diag_se"] == replayed
    tensors, meta = load_tensors(path)
    assert tuple(tensors["probe_risks"].shape) == (3, len(everyone))
    for source in ("animals", "mnist"):  # bit for bit the columns the late build replayed
        assert torch.equal(column(tensors["probe_risks"], meta, source), column(late_cols, late_meta, source))
    assert tuple(tensors["probe_diagonals"].shape) == (3, D)
    curv = kept.curvature("gtsrb")
    tau = curv.card.layout.flatten(ws.vector("animals", "star").tensors, dtype=torch.float64)
    assert risk_diagonal_stderr(probe_risks(curv.diag_probes, tau)) == pytest.approx(replayed, rel=1e-5)

    # the earlier format: diag, stderr and always probe_diagonals, no format key
    save_tensors(path, {"diag": curv.diag, "stderr": curv.diag_stderr, "probe_diagonals": curv.diag_probes},
                 {"key": kept._curvature_key("gtsrb"), "target": "gtsrb", "base_hash": ws.base_hash})
    old = Diagnostics(ws, settings=settings)
    assert old.curvature("gtsrb").operator is None  # read, not rebuilt
    assert old.pair("animals", "gtsrb", exact=False).values["risk_diag_se"] == pytest.approx(replayed, rel=1e-5)
    path.unlink()
    late.card_path("gtsrb").unlink()


def test_bench_domain_needs_probes(capsys, root):
    """--domain times the estimators: without --probes it is refused by name, before anything runs."""
    code = main(["bench", "curvature", "--quick", "--domain", "gtsrb", "--store", root, "--preset", "smoke"])
    assert code == 2 and "give --probes N" in capsys.readouterr().err
