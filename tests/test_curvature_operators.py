"""Curvature operators against dense float64 references on a tiny MLP and a tiny open_clip ViT."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diag.curvature import (
    CurvatureOperator,
    DenseOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    curvature_mode,
    exact_ggn_diagonal,
    finite_difference_check,
    select_params,
)
from train.errors import BaseMismatchError, DataError, TvdiagError, UnknownNameError

RTOL, ATOL = 1e-10, 1e-12


# ---------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def make_data(seed=1, sizes=(5, 7, 4), shape=(4,), classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
            for n in sizes]


class TinyViT(nn.Module):
    """open_clip VisionTransformer (width 16, 1 layer, patch 8, image 16) + linear head."""

    def __init__(self):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.visual = VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_ratio=2.0,
                                        output_dim=8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.visual(x))


VIT_PARAMS = ["visual.class_embedding", "visual.proj", "visual.transformer.resblocks.0.ln_1.*",
              "visual.transformer.resblocks.0.attn.out_proj.bias", "visual.ln_post.*", "head.*"]


def make_vit(seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TinyViT().double()


CASES = {
    "mlp": (make_mlp, lambda: make_data(), None),
    "vit": (make_vit, lambda: make_data(sizes=(3, 2), shape=(3, 16, 16)), VIT_PARAMS),
}


def dense_loss_fn(model, data, op):
    """Mean CE over all samples as a function of the flat subset (plain functional_call, no tvdiag code)."""
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([y for _, y in data])

    def f(flat):
        return F.cross_entropy(torch.func.functional_call(model, op.unflatten(flat), (X,)), Y)

    return f, X, Y


def dense_hessian(model, data, op):
    # torch.func.hessian is jacfwd(jacrev(f)); in torch 2.14 that composition is wrong for
    # F.layer_norm (nested vmap over its backward; the result is not even symmetric), while
    # jacfwd(grad(f)) is right (checked against finite differences). Use the latter.
    f, _, _ = dense_loss_fn(model, data, op)
    model.eval()
    with curvature_mode():
        return torch.func.jacfwd(torch.func.grad(f))(op.point()).detach()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, data_fn, params = CASES[request.param]
    model, data = build(), data_fn()
    op = HessianOperator(model, data, params=params, engine="double-backward")
    H = dense_hessian(model, data, op)
    return request.param, model, data, params, H


# ---------------------------------------------------------------------------------
# Hessian
# ---------------------------------------------------------------------------------


def test_mlp_reference_is_torch_func_hessian():
    model, data = make_mlp(), make_data()
    op = HessianOperator(model, data, engine="fwd-rev")
    f, _, _ = dense_loss_fn(model, data, op)
    H = torch.func.hessian(f)(op.point())
    torch.testing.assert_close(dense_hessian(model, data, op), H, rtol=RTOL, atol=ATOL)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, H @ v, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("engine", ["fwd-rev", "double-backward"])
def test_hvp_equals_dense_hessian(case, engine):
    name, model, data, params, H = case
    op = HessianOperator(model, data, params=params, engine=engine)
    assert op.shape == H.shape and op.engine == engine
    torch.testing.assert_close(H, H.T, rtol=RTOL, atol=ATOL)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(op.shape[0], generator=g, dtype=torch.float64)
    torch.testing.assert_close(op @ v, H @ v, rtol=RTOL, atol=ATOL)
    V = torch.randn(op.shape[0], 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H @ V, rtol=RTOL, atol=ATOL)
    assert op.num_samples == sum(len(y) for _, y in data)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_engines_agree_and_auto_records_timings(case):
    name, model, data, params, H = case
    op = HessianOperator(model, data, params=params, engine="auto")
    assert op.engine in ("fwd-rev", "double-backward")
    assert set(op.engine_timings) == {"fwd-rev", "double-backward"}, op.engine_errors
    assert all(t > 0 for t in op.engine_timings.values())
    again = HessianOperator(model, data, params=params, engine="auto")  # same shapes: the first choice, not timed again
    assert again.engine_reused and again.engine == op.engine and again.engine_timings == op.engine_timings
    with _threads(torch.get_num_threads() + 1):  # another thread count is another choice
        assert not HessianOperator(model, data, params=params, engine="auto").engine_reused
    v = torch.randn(op.shape[0], dtype=torch.float64)
    a = HessianOperator(model, data, params=params, engine="fwd-rev") @ v
    b = HessianOperator(model, data, params=params, engine="double-backward") @ v
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("engine", ["fwd-rev", "double-backward"])
def test_block_equals_single_products(case, engine):
    """A (D, k) block (one first-order graph per batch) equals k separate products to 1e-10."""
    name, model, data, params, H = case
    op = HessianOperator(model, data, params=params, engine=engine, keep_graphs=0)
    V = torch.randn(op.shape[0], 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    singles = torch.stack([op @ V[:, j] for j in range(5)], dim=1)
    torch.testing.assert_close(op @ V, singles, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(singles, H @ V, rtol=RTOL, atol=ATOL)


def test_kept_graphs_give_identical_products(case):
    """Products on kept first-order graphs equal products on rebuilt graphs, bit for bit."""
    name, model, data, params, H = case
    fresh = HessianOperator(model, data, params=params, engine="double-backward", keep_graphs=0)
    kept = HessianOperator(model, data, params=params, engine="double-backward", keep_graphs=len(data))
    part = HessianOperator(model, data, params=params, engine="double-backward", keep_graphs=1)
    assert kept.reuses_graphs and not fresh.reuses_graphs
    V = torch.randn(fresh.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = fresh @ V
    for _ in range(3):  # the first call builds the graphs, the next ones reuse them
        assert torch.equal(kept @ V, ref)
        assert torch.equal(part @ V[:, 0], ref[:, 0])
    assert len(kept._graphs) == len(data) and len(part._graphs) == 1 and not fresh._graphs
    kept.clear_graphs()
    assert not kept._graphs and torch.equal(kept @ V, ref)
    # a one-shot iterator or a non-list iterable is never cached (its batches may change)
    gen_op = HessianOperator(model, _Reiterable(data), params=params, engine="double-backward")
    assert not gen_op.reuses_graphs and torch.equal(gen_op @ V, ref) and not gen_op._graphs


def test_batched_second_backward_equals_one_by_one(case):
    """is_grads_batched over a block's tangents gives the one-by-one products (float64, 1e-10),
    and Hutchinson / Hutch++ estimates through either path agree (same probes, same estimates)."""
    from diag.curvature.hutchinson import hutchinson_diagonal
    from diag.curvature.hutchpp import hutchpp_trace

    name, model, data, params, H = case
    loop = HessianOperator(model, data, params=params, engine="double-backward", batch_tangents=False)
    batched = HessianOperator(model, data, params=params, engine="double-backward", batch_tangents=True,
                              keep_graphs=len(data))
    assert not loop.batch_tangents and batched.batch_tangents  # default: one by one
    assert not HessianOperator(model, data, params=params, engine="double-backward").batch_tangents
    V = torch.randn(loop.shape[0], 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for _ in range(2):  # builds the kept graphs, then reuses them
        torch.testing.assert_close(batched @ V, loop @ V, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(batched @ V, H @ V, rtol=RTOL, atol=ATOL)
    a = hutchinson_diagonal(loop, num_matvecs=10, seed=3, block_size=4)
    b = hutchinson_diagonal(batched, num_matvecs=10, seed=3, block_size=4)
    torch.testing.assert_close(a.mean, b.mean, rtol=RTOL, atol=ATOL)
    assert a.total == pytest.approx(b.total, rel=1e-10)
    c, d = hutchpp_trace(loop, num_matvecs=9, seed=1), hutchpp_trace(batched, num_matvecs=9, seed=1)
    assert c.value == pytest.approx(d.value, rel=1e-10) and c.stderr == pytest.approx(d.stderr, rel=1e-8)


def test_mean_gradient_is_read_off_the_kept_graphs(case):
    """The mean gradient from the first-order graphs equals torch.func.grad's; the graphs stay for the products."""
    name, model, data, params, H = case
    op = HessianOperator(model, data, params=params, engine="double-backward", keep_graphs=len(data))
    g = op.mean_gradient()
    torch.testing.assert_close(g, op.gradient(), rtol=RTOL, atol=ATOL)
    assert len(op._graphs) == len(data)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(op @ v, H @ v, rtol=RTOL, atol=ATOL)
    part = HessianOperator(model, data, params=params, engine="fwd-rev")  # no kept graphs: gradient()
    torch.testing.assert_close(part.mean_gradient(), g, rtol=RTOL, atol=ATOL)


def test_gradient_start_gives_the_exact_top_eigenvalue(case):
    """Lanczos from ĝ + r̂ (r̂: lanczos_topk's own random start) finds eigvalsh's top eigenvalue."""
    from diag.curvature import gradient_start, lanczos_topk

    name, model, data, params, H = case
    op = HessianOperator(model, data, params=params, engine="double-backward")
    v0 = gradient_start(op, seed=3)
    r = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = op.gradient()
    torch.testing.assert_close(v0, r / r.norm() + g / g.norm(), rtol=RTOL, atol=ATOL)
    top = lanczos_topk(op, 1, v0=v0, tol=1e-10)
    assert float(top.eigvals[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-9)
    with pytest.raises(TvdiagError, match="HessianOperator"):
        gradient_start(DenseOperator(H))


class _Reiterable:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_finite_difference_check(case):
    name, model, data, params, H = case
    op = HessianOperator(model, data, params=params, engine="fwd-rev")
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert finite_difference_check(op, v, eps=1e-5) < 1e-7
    # a wrong operator fails the check
    op._matvec = lambda u: 1.01 * (H @ u)
    assert finite_difference_check(op, v, eps=1e-5) > 5e-3


def test_scipy_and_dense_export(case):
    name, model, data, params, H = case
    op = HessianOperator(model, data, params=params, engine="double-backward")
    lo = op.to_scipy()
    x = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(torch.from_numpy(lo.matvec(x.numpy())), H @ x, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.from_numpy(lo.matmat(torch.eye(op.shape[0])[:, :2].double().numpy())),
                               H[:, :2], rtol=RTOL, atol=ATOL)
    if name == "mlp":
        torch.testing.assert_close(op.to_dense(chunk=7), H, rtol=RTOL, atol=ATOL)


def test_model_is_left_untouched(case):
    name, model, data, params, H = case
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fast = torch.backends.mha.get_fastpath_enabled()
    op = HessianOperator(model, data, params=params, engine="auto")
    op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert model.training and all(m.training for m in model.modules())
    assert torch.backends.mha.get_fastpath_enabled() == fast
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


# ---------------------------------------------------------------------------------
# GGN and Fisher
# ---------------------------------------------------------------------------------


def dense_ggn(model, data, op):
    X = torch.cat([x for x, _ in data])
    model.eval()
    with curvature_mode():
        logits = lambda flat: torch.func.functional_call(model, op.unflatten(flat), (X,))  # noqa: E731
        J = torch.func.jacrev(logits)(op.point())  # (N, C, D)
        p = torch.softmax(logits(op.point()), -1).detach()
    Hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncd,nce,nef->df", J, Hout, J) / X.shape[0]


def test_ggn_equals_dense_jt_hout_j(case):
    name, model, data, params, H = case
    op = GGNOperator(model, data, params=params)
    G = dense_ggn(model, data, op)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, G @ v, rtol=RTOL, atol=ATOL)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD
    diag = exact_ggn_diagonal(model, data, params=params)
    torch.testing.assert_close(diag, torch.diagonal(G), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(op.diagonal(chunk_size=2), torch.diagonal(G), rtol=RTOL, atol=ATOL)


def test_ggn_equals_hessian_for_linear_model():
    # for a model linear in its parameters the CE Hessian is exactly the GGN
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    data = make_data()
    H = HessianOperator(model, data, engine="fwd-rev").to_dense()
    G = GGNOperator(model, data).to_dense()
    torch.testing.assert_close(H, G, rtol=RTOL, atol=ATOL)


def test_empirical_fisher_equals_per_sample_outer_products():
    model, data = make_mlp(), make_data()
    op = EmpiricalFisherOperator(model, data)
    # per-sample gradients by plain autograd, one sample at a time
    grads = []
    for x, y in data:
        for xi, yi in zip(x, y):
            model.zero_grad()
            F.cross_entropy(model(xi[None]), yi[None]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    Gs = torch.stack(grads)
    Fd = Gs.T @ Gs / Gs.shape[0]
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, Fd @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(Fd), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------
# parameters, point, dtype, errors
# ---------------------------------------------------------------------------------


def test_param_globs_layout_and_errors():
    model = make_vit()
    names = select_params(model, VIT_PARAMS)
    assert names[0] == "visual.class_embedding" and "head.bias" in names
    op = HessianOperator(model, make_data(sizes=(2,), shape=(3, 16, 16)), params=VIT_PARAMS, engine="fwd-rev")
    assert op.param_names == tuple(names)
    assert op.shape[0] == sum(torch.Size(s).numel() for s in op.param_shapes)
    flat = torch.randn(op.shape[0], dtype=torch.float64)
    d = op.unflatten(flat)
    assert [tuple(t.shape) for t in d.values()] == list(op.param_shapes)
    torch.testing.assert_close(op.flatten({**d, "unrelated": torch.zeros(2)}), flat, rtol=0, atol=0)
    with pytest.raises(BaseMismatchError):
        op.flatten({k: v for k, v in list(d.items())[1:]})
    with pytest.raises(UnknownNameError, match="Available: .*visual.class_embedding"):
        HessianOperator(model, [], params=["visual.transformer.resblocks.7.*"])
    with pytest.raises(UnknownNameError, match="Available"):
        HessianOperator(model, [], loss="mse")
    with pytest.raises(UnknownNameError, match="fwd-rev"):
        HessianOperator(model, [], params="head.*", engine="fast")


def test_point_and_dtype_do_not_touch_the_model():
    model, data = make_mlp(), make_data()
    other = make_mlp(seed=5)
    point = {n: p.detach() for n, p in other.named_parameters()}
    op = HessianOperator(model, data, point=point, engine="fwd-rev")
    ref = HessianOperator(other, data, engine="fwd-rev")
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, ref @ v, rtol=RTOL, atol=ATOL)
    # a float32 model evaluated in float64 matches the float64 model
    m32 = make_mlp().float()
    data32 = [(x.float(), y) for x, y in data]
    op64 = HessianOperator(m32, data32, dtype=torch.float64, engine="double-backward")
    assert next(m32.parameters()).dtype == torch.float32
    exact = HessianOperator(make_mlp(), data, engine="double-backward") @ v
    torch.testing.assert_close(op64 @ v, exact, rtol=1e-6, atol=1e-7)
    with pytest.raises(BaseMismatchError):
        HessianOperator(model, data, point={"0.weight": torch.zeros(2, 2)})


def test_bad_data_raises():
    model = make_mlp()
    D = sum(p.numel() for p in model.parameters())
    with pytest.raises(DataError, match="empty"):
        HessianOperator(model, [], engine="fwd-rev") @ torch.zeros(D, dtype=torch.float64)
    bad = [(torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 3]))]
    with pytest.raises(DataError, match="out of range"):
        HessianOperator(model, bad, engine="fwd-rev") @ torch.zeros(D, dtype=torch.float64)
    with pytest.warns(UserWarning, match="one-shot"):
        op = HessianOperator(model, iter(make_data()), engine="fwd-rev")
    v = torch.randn(D, dtype=torch.float64)
    torch.testing.assert_close(op @ v, op @ v, rtol=0, atol=0)  # reusable after materialising


def test_dense_operator_and_limits():
    A = torch.randn(6, 6, dtype=torch.float64)
    S = A + A.T
    op = DenseOperator(S)
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(op @ v, S @ v, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(op @ S, S @ S, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.from_numpy(op.to_scipy() @ v.numpy()), S @ v, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(A + torch.eye(6, dtype=torch.float64) * 0 + torch.triu(torch.ones(6, 6, dtype=torch.float64)))
    with pytest.raises(ValueError):
        op @ torch.zeros(5, dtype=torch.float64)

    class Identity(CurvatureOperator):
        def _matvec(self, v):
            return v

    with pytest.raises(TvdiagError, match="20000"):
        Identity(20001, torch.float64, "cpu").to_dense()
    torch.testing.assert_close(Identity(3, torch.float64, "cpu").to_dense(), torch.eye(3, dtype=torch.float64))
