"""The logit-space loss model: exact where the logits are linear or quadratic along τ, the quadratic model to
second order, and the same numbers through a real open_clip tower."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diag.curvature import HessianOperator, quadratic_check
from train.model import SelfExplainingCLIP


def _data(n_in: int = 4, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, n_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
            for n in (6, 5)]


def _tau(op, seed: int = 4, scale: float = 1.0):
    return scale * torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_exact_for_logits_linear_in_the_parameters():
    """A linear classifier has b = 0: the model is the measured change at every λ, image by image."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    data = _data()
    op = HessianOperator(model, data)
    tau = _tau(op, scale=2.0)
    lt = op.logit_taylor(tau)
    assert float(lt.curvature.abs().max()) < 1e-12
    for lam in (0.3, 1.0, 4.0):
        pred, meas = lt.change(lam), op.loss_change(lam * tau)
        assert pred.mean == pytest.approx(meas.mean, rel=1e-10)
        assert pred.se == pytest.approx(meas.se, rel=1e-8)
        assert (pred.half_a, pred.half_b) == pytest.approx((meas.half_a, meas.half_b), rel=1e-10)
    # the quadratic model misses the softmax's growth at large λ; the logit model does not
    g_tau, risk = lt.taylor()
    quadratic = 4.0 * g_tau + 0.5 * 16.0 * risk
    assert abs(quadratic - op.loss_change(4.0 * tau).mean) > 0.05 * abs(op.loss_change(4.0 * tau).mean)


def test_its_expansion_is_the_quadratic_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = _data()
    op = HessianOperator(model, data, engine="fwd-rev")
    tau = _tau(op)
    lt = op.logit_taylor(tau)
    g_tau, risk = lt.taylor()
    assert g_tau == pytest.approx(float(op.gradient() @ tau), rel=1e-10)
    assert risk == pytest.approx(op.quadratic_form(tau), rel=1e-10)
    assert repr(lt) == f"LogitTaylor(images=11, classes=3, g_tau={g_tau:.6g}, risk={risk:.6g})"
    # b is the second derivative of the logits along τ: central differences of the logits
    h = 1e-4
    x = torch.cat([b[0] for b in data])
    params = dict(model.named_parameters())
    at = lambda t: torch.func.functional_call(model, {n: p + t * d for (n, p), d in  # noqa: E731
                                                     zip(params.items(), op.unflatten(tau).values())}, (x,)).detach()
    assert torch.allclose(lt.curvature, (at(h) - 2 * at(0.0) + at(-h)) / h ** 2, rtol=1e-5, atol=1e-6)


def test_exact_for_logits_quadratic_in_the_step():
    """Two linear layers in a row: the logits are a polynomial of degree 2 in λ (b ≠ 0), so the model is exact
    at every λ, where the quadratic loss model is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    op = HessianOperator(model, _data())
    tau = _tau(op)
    lt = op.logit_taylor(tau)
    assert float(lt.curvature.abs().max()) > 1e-3
    g_tau, risk = lt.taylor()
    for lam in (0.5, 2.0):
        measured = op.loss_change(lam * tau).mean
        assert lt.change(lam).mean == pytest.approx(measured, rel=1e-10)
        assert lt.change(lam, second_order=False).mean != pytest.approx(measured, rel=1e-3)
    assert g_tau * 2.0 + 2.0 * risk != pytest.approx(op.loss_change(2.0 * tau).mean, rel=0.05)


def test_quadratic_check_reports_it_cross_fitted_with_its_in_sample_validity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fit, score = _data()[:1], _data(seed=2)[:1]
    op = HessianOperator(model, fit, engine="fwd-rev")
    tau = _tau(op)
    rows = quadratic_check(model, fit, tau, ts=(0.1, 1.0, 8.0), op=op, score_data=score)
    lt = op.logit_taylor(tau)
    for r in rows:
        assert r.logit_predicted == pytest.approx(lt.change(r.t).mean, rel=1e-12)
        assert r.logit_predicted_se == pytest.approx(lt.change(r.t).se, rel=1e-12)
        assert r.estimate_measured == pytest.approx(op.loss_change(r.t * tau).mean, rel=1e-12)
        assert r.measured == pytest.approx(HessianOperator(model, score).loss_change(r.t * tau).mean, rel=1e-12)
    measured = {r.t: r.estimate_measured for r in rows}
    up_to = lt.valid_up_to(measured)
    for r in rows:  # valid where it and every smaller step hold within ×1.5 on the fitting images
        ok = all(1 / 1.5 <= s.estimate_measured / s.logit_predicted <= 1.5 for s in rows if s.t <= r.t)
        assert r.logit_valid == ok == (r.t <= up_to)
    assert rows[0].logit_valid


def test_through_a_real_open_clip_tower(tiny_backbone):
    """Nested forward mode through open_clip's attention (math kernel, no fast path) gives the same gᵀτ and τᵀHτ
    as the Hessian operator, and the fast path is restored afterwards."""
    g = torch.Generator().manual_seed(0)
    head = F.normalize(torch.randn(tiny_backbone.clip.visual.proj.shape[1], 4, generator=g), dim=0)
    model = SelfExplainingCLIP(copy.deepcopy(tiny_backbone.clip.visual), head, 20.0).double().eval()
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    data = [(x, torch.tensor([0, 2, 3]))]
    fast, native = torch.backends.mha.get_fastpath_enabled(), F.layer_norm
    op = HessianOperator(model, data, params=["visual.transformer.resblocks.0.*"])
    tau = _tau(op, scale=0.05)
    lt = op.logit_taylor(tau)
    assert torch.backends.mha.get_fastpath_enabled() == fast and F.layer_norm is native
    g_tau, risk = lt.taylor()
    assert g_tau == pytest.approx(float(op.gradient() @ tau), rel=1e-8)
    assert risk == pytest.approx(op.quadratic_form(tau), rel=1e-8)
    assert math.isfinite(lt.change(1.0).mean)
