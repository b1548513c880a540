"""The Kronecker-factored Hessian card: exact where K-FAC is exact, PSD factors, storage, the old form untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diag.curvature import build_card, GGNOperator, HessianCard, HessianOperator
from diag.curvature.kfac import build_kfac_card, build_kfac_cards, card_bytes, covered_layers, KfacCard, load_any_card
from diag.curvature.kfac.factors import _Recorder
from diag.curvature.kfac.layers import attention_forward
from diag.curvature.operators.attention import curvature_mode
from train.errors import ArtifactError, TvdiagError
from train.model import SelfExplainingCLIP

RTOL = 1e-10


def _dense_ggn(model, x):
    """``J^T (diag p − p pᵀ) J`` of one input from torch.func jacobians (the reference)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(th):
        return torch.func.functional_call(model, th, (x,))[0]

    J = torch.func.jacrev(f)(params)
    J = torch.cat([J[n].reshape(J[n].shape[0], -1) for n in params], dim=1)
    p = torch.softmax(f(params), dim=-1)
    return J.T @ (torch.diag(p) - torch.outer(p, p)) @ J


def test_one_linear_layer_one_input_equals_the_exact_ggn():
    """K-FAC of a single linear layer on one input is the GGN itself: A = a aᵀ, G = Σ_c g_c g_cᵀ."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([2])
    card = build_kfac_card(model, [(x, y)], factor_dtype=torch.float64, gradient=False)
    assert card.uncovered_names == () and len(card.layers) == 1
    ggn = _dense_ggn(model, x)
    for seed in range(3):
        tau = torch.randn(card.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert card.risk(tau) == pytest.approx(float(tau @ ggn @ tau), rel=RTOL)


def test_a_second_input_breaks_exactness():
    """The check above can fail: with two inputs the Kronecker product of means is not the mean."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.tensor([2, 0])
    card = build_kfac_card(model, [(x, y)], factor_dtype=torch.float64, gradient=False)
    ggn = (_dense_ggn(model, x[:1]) + _dense_ggn(model, x[1:])) / 2
    tau = torch.randn(card.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(card.risk(tau) / float(tau @ ggn @ tau) - 1) > 1e-3


class _TokenSum(nn.Module):
    """Logits = Σ_t W x_t + b over T tokens: weight sharing whose outputs are reduced."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(x).sum(1)


def test_reduce_is_exact_for_one_input_whose_tokens_are_summed_and_expand_is_not():
    torch.manual_seed(0)
    model = _TokenSum().double()
    x, y = torch.randn(1, 3, 5, dtype=torch.float64), torch.tensor([1])
    cards = build_kfac_cards(model, [(x, y)], factor_dtype=torch.float64, gradient=False,
                             approxes=("expand", "reduce"))
    ggn = _dense_ggn(model, x)
    tau = torch.randn(cards["reduce"].dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = float(tau @ ggn @ tau)
    assert cards["reduce"].risk(tau) == pytest.approx(exact, rel=RTOL)
    assert abs(cards["expand"].risk(tau) / exact - 1) > 1e-3


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    head = F.normalize(torch.randn(tiny_backbone.clip.visual.proj.shape[1], 5, generator=g), dim=0)
    model = SelfExplainingCLIP(copy.deepcopy(tiny_backbone.clip.visual), head, 20.0).double().eval()
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=g)
    return model, [(x[:3], y[:3]), (x[3:], y[3:])]


def test_tiny_clip_layers_are_covered_with_psd_factors_and_positive_risk(tiny_model):
    model, data = tiny_model
    card = build_kfac_card(model, data, factor_dtype=torch.float64, gradient=False)
    kinds = [sp.kind for sp in card.layers]
    assert kinds.count("in_proj") == kinds.count("linear") // 3 == 4 and kinds.count("patch") == kinds.count("proj") == 1
    assert all(n.split(".")[-1] in ("weight", "bias", "class_embedding", "positional_embedding")
               and ("ln_" in n or "embedding" in n) for n in card.uncovered_names)
    for f in [*card.A, *card.G]:
        assert torch.equal(f, f.T)
        assert float(torch.linalg.eigvalsh(f).min()) > -1e-10 * float(f.diagonal().max())
    for seed in range(3):
        tau = torch.randn(card.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert card.risk(tau) > 0


def test_diagonal_is_the_risk_of_unit_vectors(tiny_model):
    model, data = tiny_model
    card = build_kfac_card(model, data, hessian_diag=torch.rand(sum(p.numel() for p in model.parameters()),
                                                                dtype=torch.float64), factor_dtype=torch.float64)
    d = card.diagonal()
    offs = card.layout.offsets()
    for name in ("visual.proj", "visual.conv1.weight", "visual.transformer.resblocks.1.attn.in_proj_bias",
                 "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.ln_post.bias"):
        j = offs[name][0] + 5
        e = torch.zeros(card.dim, dtype=torch.float64)
        e[j] = 1.0
        assert card.risk(e) == pytest.approx(float(d[j]), rel=1e-12)


def test_trace_scaled_blocks_carry_the_hessian_trace_and_round_trip(tiny_model, tmp_path):
    model, data = tiny_model
    hdiag = torch.rand(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)
    plain = build_kfac_card(model, data, hessian_diag=hdiag, factor_dtype=torch.float64, gradient=False)
    card = build_kfac_card(model, data, hessian_diag=hdiag, factor_dtype=torch.float64, gradient=False,
                           layer_scale="trace")
    d, offs = card.diagonal(), card.layout.offsets()
    for sp in card.layers:
        idx = torch.cat([torch.arange(*offs[p]) for p in (sp.weight, sp.bias) if p is not None])
        assert float(d[idx].sum()) == pytest.approx(float(hdiag[idx].sum()), rel=1e-10)
    tau = torch.randn(card.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expect = sum(float(s) * r for s, r in zip(card.layer_scales, plain.layer_risks(tau))) + plain.risk_parts(tau)[1]
    assert card.risk(tau) == pytest.approx(expect, rel=1e-12)
    card.save(tmp_path / "c.safetensors")
    assert KfacCard.load(tmp_path / "c.safetensors").risk(tau) == pytest.approx(card.risk(tau), rel=1e-12)
    with pytest.raises(TvdiagError):
        build_kfac_card(model, data, layer_scale="trace")


def test_projection_of_one_image_equals_the_exact_ggn_block(tiny_model):
    """visual.proj sees one row (the pooled token) per image: on one image its block is exact."""
    model, data = tiny_model
    x, y = data[0][0][:1], data[0][1][:1]
    card = build_kfac_card(model, [(x, y)], params=["visual.proj"], factor_dtype=torch.float64, gradient=False)
    op = GGNOperator(model, [(x, y)], params=["visual.proj"])
    for seed in range(2):
        tau = torch.randn(card.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert card.risk(tau) == pytest.approx(float(tau @ (op @ tau)), rel=RTOL)


def test_recorded_rows_rebuild_every_covered_gradient(tiny_model):
    """Σ_rows g aᵀ of the recorded rows is the parameter gradient [∇W | ∇b] of every covered layer: the hooks,
    the explicit attention, the patch unfolding and proj's transpose see what the model computes."""
    model, data = tiny_model
    x, y = data[0]
    layers = covered_layers(model)
    with curvature_mode(), _Recorder(model, layers) as rec:
        loss = F.cross_entropy(model(x), y, reduction="sum")
        outs = [(sp, a, s) for sp in layers for a, s in rec.calls[sp.name]]
        grads = torch.autograd.grad(loss, [s for _, _, s in outs] + list(model.parameters()))
    by_name = dict(zip([n for n, _ in model.named_parameters()], grads[len(outs):]))
    for (sp, a, _), g in zip(outs, grads[:len(outs)]):
        if sp.kind == "patch":
            g = g.flatten(2).transpose(1, 2)
        got = g.reshape(-1, sp.out_dim).T @ a
        torch.testing.assert_close(got, sp.block(by_name), rtol=1e-9, atol=1e-12)


def test_explicit_attention_matches_pytorch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with curvature_mode():
        ref = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(attention_forward(mha, x, None)[0], ref, rtol=1e-12, atol=1e-12)


def test_save_load_round_trip_and_a_flipped_byte_is_refused(tiny_model, tmp_path):
    model, data = tiny_model
    diag = torch.rand(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    card = build_kfac_card(model, data, hessian_diag=diag, provenance={"target": "toy"})
    path = tmp_path / "card.safetensors"
    card.save(path)
    assert path.stat().st_size == pytest.approx(card.nbytes(), rel=0.01)
    back = load_any_card(path)
    assert isinstance(back, KfacCard) and back.provenance["target"] == "toy"
    tau = torch.randn(card.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert back.risk(tau) == card.risk(tau) and back.first_order(tau) == card.first_order(tau)
    assert card.risk_parts(tau)[1] == pytest.approx(float((diag[card.uncovered_index] * tau[card.uncovered_index] ** 2)
                                                          .sum()), rel=1e-12)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError):
        KfacCard.load(path)


def test_size_counts_packed_factors():
    layers = covered_layers(nn.Linear(3, 2))
    # A 4x4 -> 10, G 2x2 -> 3 packed entries, float32; nothing uncovered; float32 gradient of 8
    assert card_bytes(layers, dim=8, factor_bytes=4) == 13 * 4 + 8 * 4


def test_the_eigen_card_form_is_unchanged(tmp_path):
    """The eig form scores as before and still loads through the form-neutral loader."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    op = HessianOperator(model, data, engine="double-backward")
    H = op.to_dense()
    card = build_card(op, 3, residual_diag="exact")
    tau = torch.randn(op.shape[0], dtype=torch.float64)
    V, lam = card.eigvecs, card.eigvals
    expect = float((lam * (V.T @ tau) ** 2).sum() + ((torch.diagonal(H) - (V ** 2 * lam).sum(1)) * tau ** 2).sum())
    assert card.risk(tau) == pytest.approx(expect, rel=RTOL)
    card.save(tmp_path / "eig.safetensors")
    back = load_any_card(tmp_path / "eig.safetensors")
    assert isinstance(back, HessianCard) and back.risk(tau) == pytest.approx(expect, rel=RTOL)


def test_fidelity_script_exact_covered_ggn_equals_the_ggn_operator():
    """scripts/card_fidelity.py's exact covered-layer GGN (Σ_l u_ncl from the factors' pass) is τᵀ GGN τ when every
    parameter sits in a covered layer, and its block-diagonal part is the sum of the per-layer quadratic forms."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "card_fidelity", Path(__file__).resolve().parents[1] / "scripts" / "card_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))]
    layers = covered_layers(model)
    op = GGNOperator(model, data)
    taus = [op.unflatten(torch.randn(op.shape[0], generator=torch.Generator().manual_seed(s), dtype=torch.float64))
            for s in range(2)]
    full, block, _ = mod.ggn_covered(model, data, layers, taus)
    for i, tau in enumerate(taus):
        t = op.flatten(tau)
        assert float(full[i]) == pytest.approx(float(t @ (op @ t)), rel=1e-10)
        parts = 0.0
        for sp in layers:
            names = [n for n in (sp.weight, sp.bias) if n]
            sub = GGNOperator(model, data, params=names)
            ts = sub.flatten(tau)
            parts += float(ts @ (sub @ ts))
        assert float(block[i]) == pytest.approx(parts, rel=1e-10)
