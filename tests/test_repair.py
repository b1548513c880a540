"""Curvature-aware repairs (diag/transfer/repair.py) on a quadratic loss with a known Hessian, and the
val-only choice of their hyper-parameter (diag/transfer/select.py) on the smoke store."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from diag.curvature.card import HessianCard
from diag.curvature.operators import DenseOperator
from diag.transfer.blocks import (
    apply_block_coefficients,
    block_coefficients,
    block_masks,
    block_risk_matrix,
    block_sizes,
    parameter_blocks,
)
from diag.transfer.mixing import mix, mix_weights, universal
from diag.transfer.repair import card_diagonal, choose_k_by_share, flat_of, precondition, project, with_flat
from diag.curvature.params import ParamLayout
from train.errors import DataError, UnknownNameError
from train.vectors import TaskVector

D = 12


def spd(seed: int = 0, d: int = D):
    """H = Q diag(l) Qᵀ with known descending eigenvalues l and orthonormal Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.linspace(5.0, 0.1, d, dtype=torch.float64)
    return Q @ torch.diag(lam) @ Q.T, lam, Q


def vec(seed: int = 1, d: int = D):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------ projection


@pytest.mark.parametrize("k", [0, 1, 3, D])
def test_project_removes_exactly_top_k(k):
    H, lam, Q = spd()
    tau = vec()
    out = project(tau, Q[:, :max(k, 1)] if k else Q[:, :1], k)
    a, b = Q.T @ tau, Q.T @ out
    assert torch.allclose(b[:k], torch.zeros(k, dtype=torch.float64), atol=1e-13)  # residual orthogonal
    assert torch.allclose(b[k:], a[k:], atol=1e-13)  # other directions untouched
    # risk falls by exactly the removed eigen-contributions (eq. 19)
    removed = float((lam[:k] * a[:k].pow(2)).sum())
    assert float(tau @ H @ tau) - float(out @ H @ out) == pytest.approx(removed, rel=1e-12, abs=1e-12)


def test_project_accepts_rows_and_cards():
    H, lam, Q = spd()
    tau = vec()
    cols = project(tau, Q[:, :4])
    assert torch.equal(project(tau, Q[:, :4].T.contiguous()), cols)  # (k, D) rows
    card = HessianCard(lam[:4], Q[:, :4], torch.zeros(D, dtype=torch.float64), ("w",), ((D,),))
    assert torch.allclose(project(tau, card), cols, atol=1e-14)
    assert torch.allclose(project(tau, card, 2), project(tau, Q[:, :2]), atol=1e-14)


def test_choose_k_by_share():
    _, lam, Q = spd()
    tau = Q[:, 0] * 1.0 + Q[:, 1] * 2.0 + Q[:, 2] * 0.5  # contributions 5·1, l1·4, l2·0.25
    c = lam[:3] * torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    share1 = float(c[0] / c.sum())
    assert choose_k_by_share(lam, Q, tau, share1 - 1e-9) == 1
    assert choose_k_by_share(lam, Q, tau, share1 + 1e-9) == 2
    assert choose_k_by_share(lam, Q, tau, 1.0) == 3
    assert choose_k_by_share(lam, Q, torch.zeros(D, dtype=torch.float64), 0.5) == 0


# -------------------------------------------------------------------------- preconditioning


def test_precondition_matches_formula_elementwise():
    d = torch.tensor([0.0, 1.0, 3.0, -2.0, 4.0], dtype=torch.float64)
    tau = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    h = d.clamp_min(0)
    for c in (0.0, 0.3, 10.0):
        expect = [t / (1 + c * hi / float(h.mean())) for t, hi in zip(tau.tolist(), h.tolist())]
        assert precondition(tau, d, c).tolist() == pytest.approx(expect, rel=1e-15)


def test_card_diagonal_is_the_card_models_diagonal():
    H, lam, Q = spd()
    card = HessianCard(lam[:3], Q[:, :3], torch.diagonal(H - Q[:, :3] @ torch.diag(lam[:3]) @ Q[:, :3].T).clone(),
                       ("w",), ((D,),))
    assert torch.allclose(card_diagonal(card), torch.diagonal(H), atol=1e-13)


# ------------------------------------------------------------------------------- blocks


class CountingOperator(DenseOperator):
    """A dense operator that counts the vectors it multiplies."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.columns = 0

    def _matmat(self, V):
        self.columns += V.shape[1]
        return super()._matmat(V)


def test_block_risk_matrix_equals_dense_with_one_hvp_per_block():
    H, _, _ = spd()
    tau = vec()
    layout = ParamLayout(("a", "b", "c"), ((3,), (5,), (4,)))
    masks = block_masks(layout, {"x": ["a", "c"], "y": ["b"]})
    op = CountingOperator(H)
    R = block_risk_matrix(op, tau, masks)
    parts = [masks[i] * tau for i in range(2)]
    dense = torch.tensor([[float(p @ H @ q) for q in parts] for p in parts], dtype=torch.float64)
    assert torch.allclose(R, dense, rtol=1e-13, atol=1e-13)
    assert op.columns == 2
    assert float(R.sum()) == pytest.approx(float(tau @ H @ tau), rel=1e-12)
    lam = np.array([0.3, 0.9])
    t2 = apply_block_coefficients(tau, masks, lam)
    assert float(t2 @ H @ t2) == pytest.approx(float(lam @ R.numpy() @ lam), rel=1e-12)
    assert block_sizes(tau, masks).tolist() == pytest.approx([float(p @ p) for p in parts], rel=1e-14)


def test_block_solution_interior_meets_budget_with_equality():
    R = np.array([[2.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 3.0]])
    s = np.array([1.0, 2.0, 1.5])
    sol = block_coefficients(R, s, budget=0.05, lam_max=1.2)
    assert sol.method == "closed-form" and sol.interior and not sol.psd_projected
    assert 0.5 * sol.lam @ R @ sol.lam == pytest.approx(0.05, rel=1e-12)
    assert sol.loss_increase == pytest.approx(0.05, rel=1e-12)
    direction = np.linalg.solve(R, s)
    assert np.allclose(sol.lam / np.linalg.norm(sol.lam), direction / np.linalg.norm(direction), atol=1e-12)
    # no feasible point of a random cloud does better
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1.2, size=(4000, 3))
    ok = 0.5 * np.einsum("ni,ij,nj->n", pts, R, pts) <= 0.05
    assert (pts[ok] @ s).max() <= sol.size + 1e-12


def test_block_solution_respects_bounds_and_is_optimal_on_a_grid():
    R = np.array([[4.0, -1.0], [-1.0, 0.5]])  # R⁻¹s leaves the box for this budget
    s = np.array([1.0, 3.0])
    sol = block_coefficients(R, s, budget=0.4, lam_max=1.0)
    assert sol.method == "slsqp"
    assert (sol.lam >= 0).all() and (sol.lam <= 1.0 + 1e-12).all()
    assert sol.loss_increase <= 0.4 * (1 + 1e-9)
    grid = np.array(list(itertools.product(np.linspace(0, 1, 401), repeat=2)))
    ok = 0.5 * np.einsum("ni,ij,nj->n", grid, R, grid) <= 0.4
    assert sol.size >= (grid[ok] @ s).max() - 1e-6


def test_block_solution_all_max_and_psd_projection():
    R = np.eye(3) * 0.1
    sol = block_coefficients(R, np.ones(3), budget=10.0, lam_max=1.2)
    assert sol.method == "all-max" and np.allclose(sol.lam, 1.2)
    bad = np.array([[1.0, 0.0], [0.0, -0.5]])
    sol = block_coefficients(bad, np.array([1.0, 1.0]), budget=0.1, lam_max=1.0)
    assert sol.psd_projected
    assert sol.loss_increase <= 0.1 * (1 + 1e-9) and sol.lam[1] == pytest.approx(1.0)
    with pytest.raises(DataError, match="budget"):
        block_coefficients(R, np.ones(3), budget=-1.0, lam_max=1.0)


def test_parameter_blocks_open_clip_names():
    names = ["visual.class_embedding", "visual.conv1.weight", "visual.ln_post.bias", "visual.proj",
             "visual.transformer.resblocks.10.ln_1.weight", "visual.transformer.resblocks.2.mlp.c_fc.bias",
             "visual.ln_pre.weight", "visual.positional_embedding"]
    blocks = parameter_blocks(names)
    assert list(blocks) == ["embeddings", "block.2", "block.10", "ln_post+proj"]
    assert blocks["embeddings"] == ["visual.class_embedding", "visual.conv1.weight", "visual.ln_pre.weight",
                                    "visual.positional_embedding"]
    assert blocks["ln_post+proj"] == ["visual.ln_post.bias", "visual.proj"]
    with pytest.raises(Exception, match="text_projection"):
        parameter_blocks(["text_projection"])


# ------------------------------------------------------------------------------ mixes


def _tv(value: float) -> TaskVector:
    return TaskVector({"w": torch.full((2,), value), "v": torch.full((3,), 2 * value)}, "b0")


def test_mix_normalises_and_refuses_target():
    vs = {"a": _tv(1.0), "b": _tv(4.0), "t": _tv(100.0)}
    out = mix({k: vs[k] for k in "ab"}, {"a": 3.0, "b": 1.0}, target="t")
    assert out.tensors["w"].tolist() == pytest.approx([1.75, 1.75])
    with pytest.raises(DataError, match="'t'"):
        mix(vs, {"a": 1.0, "b": 1.0}, target="t")
    with pytest.raises(DataError, match="all 0"):
        mix({"a": vs["a"]}, {"a": 0.0}, target="t")
    assert universal(vs, "t").tensors["v"].tolist() == pytest.approx([5.0] * 3)
    w = mix_weights({"a": -1.0, "b": 0.5, "t": 9.0}, "t")
    assert w == {"a": 0.0, "b": 1.0}
    assert mix({k: vs[k] for k in "ab"}, w, "t").tensors["w"].tolist() == pytest.approx([4.0, 4.0])
    assert mix_weights({"a": -1.0, "b": 0.0, "c": float("nan")}, "t") == {}


def test_flat_roundtrip_leaves_other_tensors():
    tv = TaskVector({"a": torch.arange(3.0), "b": torch.ones(2, 2), "c": torch.zeros(1)}, "b0")
    layout = ParamLayout(("b", "a"), ((2, 2), (3,)))
    flat = flat_of(tv, layout)
    assert flat.tolist() == [1, 1, 1, 1, 0, 1, 2]
    out = with_flat(tv, 2 * flat, layout, "x2")
    assert out.tensors["a"].tolist() == [0, 2, 4] and out.tensors["b"].tolist() == [[2, 2], [2, 2]]
    assert out.tensors["c"] is tv.tensors["c"] and out.base_hash == "b0"


# --------------------------------------------------------------- val-only selection (smoke)

SUBSET = ["visual.proj", "visual.ln_post.*", "visual.transformer.resblocks.1.mlp.c_proj.*",
          "visual.transformer.resblocks.0.ln_2.*"]  # the smoke backbone's two blocks


@pytest.fixture(scope="module")
def smoke():
    """(store, target, source, curvature of Hᵀ on 16 target train images over a parameter subset)."""
    from diag.runtime.context import Workspace
    from diag.curvature.card import build_card
    from diag.curvature.operators import HessianOperator
    from diag.transfer.methods import RepairCurvature
    from tests._smoke import one_thread, smoke_store
    from train.datasets import model_inputs

    store = smoke_store()
    ws = Workspace(store)
    target, source = "gtsrb", "mnist"
    with one_thread():
        model = store.model(target, ws.state(ws.vector(target, "ft")), backbone=ws.backbone)
        x, y = model_inputs(ws.backbone.config, target, "train", 16)
        op = HessianOperator(model, [(x, y)], params=SUBSET, engine="double-backward")
        card = build_card(op, 3, residual_diag=None, provenance={"target": target}, method="lanczos")
    return store, target, source, RepairCurvature(op.layout, card_diagonal(card), card, op)


def _choose(store, target, source, curv, method, **kwargs):
    from diag.runtime.context import Workspace
    from diag.transfer.select import select_repair
    from tests._smoke import one_thread

    ws = Workspace(store)
    with one_thread():
        return select_repair(ws, target, ws.vector(source, "star"), method, curv, n_images=64, **kwargs)


def _poison(monkeypatch, split):
    """Replace ``split``'s images by noise and its labels by class 0 (every domain), and every stored φ by noise."""
    import train.datasets as datasets
    from diag.features import pair_features
    from diag.runtime import context
    from train.store import Store

    real_inputs, real_attr = datasets.model_inputs, Store.load_attributions

    def inputs(config, domain, which, limit=None, data=None):
        x, y = real_inputs(config, domain, which, limit, data)
        if which != split:
            return x, y
        g = torch.Generator().manual_seed(7)
        return torch.randn(x.shape, generator=g) * 3, torch.zeros_like(y)

    def attributions(self, domain):
        return {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in real_attr(self, domain).items()}

    for module in (datasets, context, pair_features):  # every module that reads images through it
        monkeypatch.setattr(module, "model_inputs", inputs)
    monkeypatch.setattr(Store, "load_attributions", attributions)


@pytest.mark.parametrize("method", ["precondition", "blocks"])
def test_selection_never_reads_test_split(smoke, monkeypatch, method):
    store, target, source, curv = smoke
    clean = _choose(store, target, source, curv, method)
    assert clean.table["val_accuracy"].between(0, 1).all() and len(clean.table) > 1
    assert clean.candidate.risk_source == "exact" and clean.val_accuracy_ft_target > 0
    # every measured drop carries its paired se over the same 64 val images
    assert clean.n_val == 64 and (clean.table["acc_drop_se"] >= 0).all() and math.isfinite(clean.val_acc_drop_se)
    with monkeypatch.context() as m:
        _poison(m, "test")
        poisoned = _choose(store, target, source, curv, method)
    assert poisoned.candidate.param == clean.candidate.param and poisoned.summary() == clean.summary()
    pd_cols = ["param", "val_accuracy", "size", "predicted_loss_increase", "measured_loss_increase"]
    assert poisoned.table[pd_cols].equals(clean.table[pd_cols])
    with monkeypatch.context() as m:  # the same poison on val does change the measurements
        _poison(m, "val")
        on_val = _choose(store, target, source, curv, method)
    assert not on_val.table["val_accuracy"].equals(clean.table["val_accuracy"])


def test_selection_rule_and_refusals(smoke):
    from diag.runtime.context import Workspace
    from diag.transfer.methods import RepairCurvature
    from diag.transfer.select import _best, _mark_safe, select_repair

    # the rule's branches on hand-made tables: the largest safe size (ties: the smaller predicted loss) ...
    t = pd.DataFrame({"param": [0.4, 0.7, 1.0, 1.0], "size": [1.0, 2.0, 3.0, 3.0], "acc_drop": [0.01, 0.03, 0.02, 0.04],
                      "predicted_loss_increase": [0.1, 0.2, 0.4, 0.3], "val_accuracy": [0.90, 0.88, 0.89, 0.87]})
    assert _best(_mark_safe(t, by_param=False, budget=0.05)) == 3
    assert _best(_mark_safe(t, by_param=False, budget=0.035)) == 1  # size 3's worse row (0.04) makes size 3 unsafe
    # ... and with nothing safe, the best val accuracy (ties: the larger size)
    none = _mark_safe(t.assign(acc_drop=0.5, val_accuracy=[0.5, 0.6, 0.6, 0.4]), by_param=False, budget=0.05)
    assert not none["safe"].any() and _best(none) == 2
    # the smoke store's real choice obeys the same rule, recomputed here from its table
    store, target, source, curv = smoke
    choice = _choose(store, target, source, curv, "plain", grid=(0.4, 0.7, 1.2))
    table = choice.table.sort_values("size")
    prefix_ok = (table["acc_drop"] <= choice.max_acc_drop + 1e-9).cummin()
    if prefix_ok.any():
        assert choice.safe and choice.candidate.size == pytest.approx(table[prefix_ok]["size"].max())
    else:
        assert not choice.safe and choice.val_accuracy == pytest.approx(table["val_accuracy"].max())
    norm = Workspace(store).vector(source, "star").norm()  # plain's size is λ2·‖τ‖
    assert choice.table["size"].tolist() == pytest.approx([lam * norm for lam in choice.table["param"]], rel=1e-6)
    # refusals: curvature of another target, an unknown method, a budget outside [0, 1)
    ws = Workspace(store)
    other = RepairCurvature(curv.layout, curv.diag, curv.card)
    with pytest.raises(DataError, match="built for 'gtsrb'"):
        select_repair(ws, "animals", ws.vector(source, "star"), "precondition", other)
    with pytest.raises(UnknownNameError, match="repair method"):
        select_repair(ws, target, ws.vector(source, "star"), "sharpen", curv)
    with pytest.raises(DataError, match="max_acc_drop"):
        select_repair(ws, target, ws.vector(source, "star"), "plain", curv, max_acc_drop=1.0)


def test_method_mixes_exclude_the_target(smoke):
    from diag.runtime.context import Workspace
    from diag.transfer.select import method_mixes
    from tests._smoke import DOMAINS

    store, target, _, curv = smoke
    ws = Workspace(store)
    universal_mix = method_mixes("mix", ws, target, DOMAINS)
    ranked = method_mixes("mix-ranked", ws, target, DOMAINS, {"mnist": 0.2, "animals": -0.1, target: 5.0})
    others = [d for d in DOMAINS if d != target]
    name = "visual.proj"
    mean = sum(ws.vector(d, "star").tensors[name].double() for d in others) / len(others)
    assert torch.allclose(universal_mix["universal"].tensors[name].double(), mean, atol=1e-6)
    assert torch.equal(ranked["ranked"].tensors[name], ws.vector("mnist", "star").tensors[name])
    mixes = {**universal_mix, **ranked}
    choice = _choose(store, target, "mnist", curv, "mix", mixes=mixes, grid=(0.7,))
    assert set(choice.table["param"]) == {"universal", "ranked"} and choice.candidate.risk_source == "exact"


def test_safe_needs_every_smaller_candidate_to_keep():
    from diag.transfer.select import _best, _mark_safe

    t = pd.DataFrame({"param": [0.4, 0.7, 1.0, 1.2], "size": [1.0, 2.0, 3.0, 4.0],
                      "acc_drop": [0.01, 0.04, 0.08, 0.02], "predicted_loss_increase": [1.0, 2.0, 3.0, 4.0],
                      "val_accuracy": [0.9, 0.9, 0.8, 0.9]})
    marked = _mark_safe(t, by_param=False, budget=0.05)
    assert marked["safe"].tolist() == [True, True, False, False]
    assert _best(marked) == 1
    mixed = _mark_safe(t.assign(param=["u", "u", "g", "g"]), by_param=True, budget=0.05)
    assert mixed["safe"].tolist() == [True, True, False, False]


def test_candidates_predict_half_lambda_squared_risk_on_a_known_hessian():
    from diag.transfer.methods import RepairCurvature, candidates

    H, lam, Q = spd()
    layout = ParamLayout(("visual.proj", "visual.transformer.resblocks.0.mlp.c_fc.bias"), ((4,), (8,)))
    tau_flat = vec()
    tv = TaskVector(layout.unflatten(tau_flat.clone()), "b0")
    card = HessianCard(lam[:4], Q[:, :4], torch.zeros(D, dtype=torch.float64), layout.names, layout.shapes)
    curv = RepairCurvature(layout, torch.diagonal(H).clone(), card, DenseOperator(H))
    a = Q.T @ tau_flat
    for c in candidates("project", tv, curv, lambda2=0.7, grid=(1, 4)):
        removed = float((lam[:c.param] * a[:c.param].pow(2)).sum())
        assert c.predicted_loss_increase == pytest.approx(0.5 * 0.49 * (float(tau_flat @ H @ tau_flat) - removed))
        assert c.risk_source == "exact" and c.scale == 0.7
    plain = 0.5 * 0.49 * float(tau_flat @ H @ tau_flat)
    blocks = candidates("blocks", tv, curv, lambda2=0.7, grid=(0.25, 1.0))
    assert [b.predicted_loss_increase <= f * plain * (1 + 1e-9) for b, f in zip(blocks, (0.25, 1.0))] == [True] * 2
    assert blocks[0].size < blocks[1].size
    pre = candidates("precondition", tv, curv, grid=(0.0,))[0]
    assert torch.equal(pre.vector.tensors["visual.proj"], tv.tensors["visual.proj"])


def test_tier1_recommendation_is_the_largest_safe_size_on_a_known_hessian():
    """Tier 1 (a card only): drop(candidate) = drop(eq. 8 at 0.7)·R(candidate)/R(τ); the largest safe size wins.

    The expectation is computed here by hand from the card's matrix H₄ = Q₄ diag(l₄) Q₄ᵀ (no residual):
    preconditioning τ_c = τ / (1 + c·h/h̄) with h = diag(H₄), projection τ_k = τ − Q_k Q_kᵀ τ; size
    ratio ⟨τ', τ⟩/‖τ‖².
    """
    from diag.decide.recommend import predicted_gain, recommend_predicted
    from diag.transfer.repair import PRECONDITION_GRID

    H, lam, Q = spd()
    layout = ParamLayout(("visual.proj", "visual.transformer.resblocks.0.mlp.c_fc.bias"), ((4,), (8,)))
    tau_flat = Q[:, 0] * 3.0 + vec() * 0.1  # most of τ along the most curved direction
    tv = TaskVector(layout.unflatten(tau_flat.clone()), "b0")
    card = HessianCard(lam[:4], Q[:, :4], torch.zeros(D, dtype=torch.float64), layout.names, layout.shapes)
    H4 = Q[:, :4] @ torch.diag(lam[:4]) @ Q[:, :4].T
    norm2 = float(tau_flat @ tau_flat)

    def hand(vector):  # (size ratio, predicted drop) of adding ``vector`` at λ2 = 0.7
        drop = 0.2 * float(vector @ H4 @ vector) / float(tau_flat @ H4 @ tau_flat)
        return float(vector @ tau_flat) / norm2, drop

    h = torch.diagonal(H4)
    pre = [hand(tau_flat / (1 + c * h / h.mean())) for c in PRECONDITION_GRID]
    proj = [hand(tau_flat - Q[:, :k] @ (Q[:, :k].T @ tau_flat)) for k in range(1, 5)]
    # eq. 8 at 0.7 drops 20 %: plain's quadratic λ2 is 0.7·√(0.05/0.2) = 0.35 < 0.4, no plain λ2 is safe
    rec = recommend_predicted(0.2, 0.05, norm2 ** 0.5, card, tv, ("plain", "precondition"))
    safe = [size for size, drop in pre if drop <= 0.05 + 1e-9]
    assert safe and (rec["method"], rec["safe"], rec["drop_measured"]) == ("precondition", True, False)
    assert rec["size_ratio"] == pytest.approx(max(safe), rel=1e-9)
    rec = recommend_predicted(0.2, 0.05, norm2 ** 0.5, card, tv, ("plain", "project"))
    k = int(rec["method_param"])
    assert rec["method"] == "project" and rec["safe"] and proj[k - 1][1] <= 0.05 + 1e-9
    assert rec["size_ratio"] == pytest.approx(proj[k - 1][0], rel=1e-9)
    assert rec["size_ratio"] == pytest.approx(max(size for size, drop in proj if drop <= 0.05 + 1e-9), rel=1e-9)
    # nothing safe: plain's row, flagged, and it transfers no predicted gain
    none = recommend_predicted(50.0, 0.05, norm2 ** 0.5, card, tv, ("plain", "precondition"))
    assert (none["method"], none["safe"]) == ("plain", False)
    assert predicted_gain(0.8, 0.7, 0.9, none["size_ratio"], none["safe"]) == (0.0, 0.0, 0.0)
    # g = (1 − ratio)·size; the ratio's interval [0.7, 0.9] maps to [(1 − 0.9)·size, (1 − 0.7)·size]
    assert predicted_gain(0.8, 0.7, 0.9, 0.5, True) == pytest.approx((0.1, 0.05, 0.15))
    # tier 0: plain only, λ2 from the quadratic model
    t0 = recommend_predicted(0.02, 0.05, norm2 ** 0.5)
    assert (t0["method"], float(t0["method_param"])) == ("plain", 1.1)  # 0.7·√(0.05/0.02) = 1.107 → 1.1
