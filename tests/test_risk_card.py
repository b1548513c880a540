"""Risk R(tau; H) = tau^T H tau, its approximations, the quadratic check and the Hessian card."""

import math
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diag.curvature import (
    DenseOperator,
    HessianCard,
    HessianOperator,
    RiskResult,
    build_card,
    eigen_contributions,
    quadratic_check,
    rank_agreement,
    risk_diagonal,
    risk_exact,
)
from train.errors import ArtifactError, BaseMismatchError, TvdiagError

RTOL, ATOL = 1e-10, 1e-12


def make_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in (6, 4)]
    return model, data


@pytest.fixture(scope="module")
def problem():
    model, data = make_problem()
    op = HessianOperator(model, data, engine="double-backward")
    H = op.to_dense()
    return model, data, op, H


def test_risk_exact_equals_dense_quadratic_form(problem):
    model, data, op, H = problem
    tau = torch.randn(op.shape[0], dtype=torch.float64)
    assert risk_exact(op, tau) == pytest.approx(float(tau @ H @ tau), rel=RTOL)
    # dict input with extra names
    assert risk_exact(op, {**op.unflatten(tau), "other": torch.ones(3)}) == pytest.approx(float(tau @ H @ tau), rel=RTOL)
    with pytest.raises(BaseMismatchError):
        risk_exact(op, torch.zeros(op.shape[0] + 1, dtype=torch.float64))


def test_risk_diagonal_hand_value():
    assert risk_diagonal(torch.tensor([1.0, 2.0, -0.5]), torch.tensor([3.0, 1.0, 2.0])) == 9.0 + 2.0 - 2.0
    with pytest.raises(BaseMismatchError):
        risk_diagonal(torch.ones(3), torch.ones(4))


def test_risk_diagonal_stderr_covers_at_nominal_rate():
    """95 % t-intervals of R_diag from the per-probe risks cover Σ A_ii τ_i² in ~95 % of seeds."""
    from diag.curvature import DenseOperator, hutchinson_diagonal, risk_diagonal_estimate

    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 20, generator=g, dtype=torch.float64)
    M = X @ X.T / 20 + torch.diag(torch.linspace(0, 2, 20, dtype=torch.float64))
    A, tau = DenseOperator(M), torch.randn(20, generator=g, dtype=torch.float64)
    exact = risk_diagonal(torch.diagonal(M), tau)
    n_seeds, hits = 400, 0
    for seed in range(n_seeds):
        est = hutchinson_diagonal(A, num_matvecs=10, seed=seed, keep_probes=True)
        r = risk_diagonal_estimate(est, tau)
        assert r.value == pytest.approx(risk_diagonal(est.mean, tau), rel=1e-12)
        assert r.n_probes == 10 and r.stderr > 0
        lo, hi = r.ci95()
        hits += lo <= exact <= hi
    # binomial(400, 0.95): sd 1.1 %; the band is ±3.3 sd
    assert 0.91 <= hits / n_seeds <= 0.99, hits / n_seeds
    with pytest.raises(TvdiagError):
        risk_diagonal_estimate(hutchinson_diagonal(A, num_matvecs=4), tau)
    with pytest.raises(BaseMismatchError):
        risk_diagonal_estimate(est, torch.ones(3))


def test_risk_diag_se_matches_the_spread_over_probe_seeds(problem):
    """On a real (MLP) Hessian, the se of R_diag from one run's probes matches the sd of R_diag
    over 20 independent probe seeds within a factor 2; risk_diagonal_stderr = risk_diagonal_estimate's."""
    from diag.curvature import hutchinson_diagonal, probe_risks, risk_diagonal_estimate, risk_diagonal_stderr

    model, data, op, H = problem
    tau = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values, ses = [], []
    for seed in range(20):
        est = hutchinson_diagonal(op, num_matvecs=16, seed=seed, keep_probes=True)
        r = risk_diagonal_estimate(est, tau)
        assert risk_diagonal_stderr(probe_risks(est.probe_diagonals, tau)) == pytest.approx(r.stderr, rel=1e-12)
        values.append(r.value)
        ses.append(r.stderr)
    spread = float(torch.tensor(values).std())
    typical = math.sqrt(sum(se * se for se in ses) / len(ses))
    assert 0.5 <= typical / spread <= 2.0, (typical, spread)
    exact = risk_diagonal(torch.diagonal(H), tau)
    assert abs(sum(values) / 20 - exact) <= 4 * typical / math.sqrt(20)


def test_risk_se_from_probe_scalars_equals_the_per_probe_diagonals_computation(problem, tmp_path):
    """Same seeds: the per-probe scalars r_k = d_kᵀ(τ ⊙ τ) accumulated during the run (no (n, D) tensor) give
    the mean and se of R_diag that the kept per-probe diagonals give, to 1e-12 — from one run, from a run
    interrupted and resumed from its checkpoint (bit for bit), and per column whatever the other columns."""
    from diag.curvature import hutchinson_diagonal, probe_risks, risk_diagonal_estimate
    from diag.curvature.checkpoint import ProbeCheckpoint

    model, data, op, H = problem
    g = torch.Generator().manual_seed(4)
    taus = torch.randn(op.shape[0], 2, generator=g, dtype=torch.float64)
    old = hutchinson_diagonal(op, num_matvecs=10, seed=7, block_size=3, keep_probes=True)
    new = hutchinson_diagonal(op, num_matvecs=10, seed=7, block_size=3, functionals=taus.pow(2))
    assert new.probe_diagonals is None and tuple(new.probe_functionals.shape) == (10, 2)
    one = hutchinson_diagonal(op, num_matvecs=10, seed=7, block_size=3, functionals=taus[:, 1].pow(2))
    assert torch.equal(one.probe_functionals[:, 0], new.probe_functionals[:, 1])
    for j in range(2):
        want = risk_diagonal_estimate(old, taus[:, j])
        got = risk_diagonal_estimate(new, taus[:, j], column=j)
        torch.testing.assert_close(got.probe_values, probe_risks(old.probe_diagonals, taus[:, j]), rtol=1e-12, atol=0)
        assert got.value == pytest.approx(want.value, rel=1e-12) and got.stderr == pytest.approx(want.stderr, rel=1e-12)
    with pytest.raises(TvdiagError, match="not accumulated"):
        risk_diagonal_estimate(new, taus[:, 1], column=0)
    ck = ProbeCheckpoint(tmp_path / "ck.safetensors", every=3)

    class Stop(Exception):
        pass

    def stop(state):
        if state.n >= 6:
            raise Stop

    with pytest.raises(Stop):
        hutchinson_diagonal(op, num_matvecs=10, seed=7, block_size=3, functionals=taus.pow(2), checkpoint=ck,
                            callback=stop)
    resumed = hutchinson_diagonal(op, num_matvecs=10, seed=7, block_size=3, functionals=taus.pow(2), checkpoint=ck)
    assert torch.equal(resumed.probe_functionals, new.probe_functionals) and torch.equal(resumed.mean, new.mean)
    assert torch.equal(resumed.stderr, new.stderr)
    with pytest.raises(ArtifactError, match="functionals"):  # another τ: the checkpoint is refused
        hutchinson_diagonal(op, num_matvecs=10, seed=7, block_size=3, functionals=taus.pow(3), checkpoint=ck)


class _OneWeightPerSample(nn.Module):
    """Sample i = (j_i, x_i) has logits (w_{j_i} x_i, 0): each CE term depends on one weight, so
    H is diagonal with H_jj = (1/N) Σ_{i: j_i = j} x_i² p_i (1 − p_i), p_i = σ(w_j x_i)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        z = self.w[x[:, 0].long()] * x[:, 1]
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_risk_diag_se_is_zero_on_a_closed_form_diagonal_hessian():
    """Every ±1 probe gives v ⊙ Hv = diag(H) exactly when H is diagonal: R_diag is exact and its se 0."""
    from diag.curvature import exact_diagonal, hutchinson_diagonal, probe_risks, risk_diagonal_estimate


    g = torch.Generator().manual_seed(0)
    D, N = 7, 40
    model = _OneWeightPerSample(torch.randn(D, generator=g, dtype=torch.float64))
    j = torch.arange(N) % D
    x = torch.stack([j.double(), torch.randn(N, generator=g, dtype=torch.float64)], dim=1)
    y = torch.randint(0, 2, (N,), generator=g)
    p = torch.sigmoid(model.w.detach()[j] * x[:, 1])
    closed = torch.zeros(D, dtype=torch.float64).index_add_(0, j, x[:, 1] ** 2 * p * (1 - p)) / N
    op = HessianOperator(model, [(x[:25], y[:25]), (x[25:], y[25:])], engine="double-backward")
    tau = torch.randn(D, generator=g, dtype=torch.float64)
    want = float((closed * tau ** 2).sum())
    est = hutchinson_diagonal(op, num_matvecs=12, seed=5, keep_probes=True)
    torch.testing.assert_close(est.mean, closed, rtol=1e-12, atol=1e-15)
    r = risk_diagonal_estimate(est, tau)
    assert r.value == pytest.approx(want, rel=1e-12)
    assert r.stderr <= 1e-14 * want and float(probe_risks(est.probe_diagonals, tau).std()) <= 1e-14 * want
    ex = risk_diagonal_estimate(exact_diagonal(op), tau)
    assert ex.value == pytest.approx(want, rel=1e-12) and ex.stderr == 0.0


def test_eigen_contributions_sum_to_risk(problem):
    model, data, op, H = problem
    vals, vecs = torch.linalg.eigh(H)
    tau = torch.randn(op.shape[0], dtype=torch.float64)
    contrib, remainder = eigen_contributions(vals, vecs, tau)
    assert float(contrib.sum()) == pytest.approx(float(tau @ H @ tau), rel=1e-9)
    assert remainder == pytest.approx(0.0, abs=1e-20)
    contrib3, rem3 = eigen_contributions(vals[-3:], vecs[:, -3:], tau)
    torch.testing.assert_close(contrib3, contrib[-3:], rtol=RTOL, atol=ATOL)
    assert rem3 == pytest.approx(float(tau @ tau) - float((vecs[:, -3:].T @ tau).pow(2).sum()), rel=1e-9)


def test_card_with_k_equal_d_is_exact(problem, tmp_path):
    model, data, op, H = problem
    D = op.shape[0]
    card = build_card(op, D, residual_diag="exact", provenance={"target": "toy", "seed": 0})
    assert card.k == D and card.dim == D
    assert card.residual_diag.abs().max() < 1e-12
    assert card.trace == pytest.approx(float(torch.trace(H)), rel=RTOL) and card.trace_stderr == 0.0
    torch.testing.assert_close(card.eigvals, torch.linalg.eigvalsh(H).flip(0), rtol=1e-9, atol=1e-12)
    for seed in range(3):
        tau = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert card.risk(tau) == pytest.approx(risk_exact(op, tau), rel=1e-9, abs=1e-12)
        assert card.risk(op.unflatten(tau)) == pytest.approx(card.risk(tau), rel=RTOL)
    assert card.provenance["target"] == "toy" and card.provenance["eig_method"] == "dense-eigh"
    assert "HessianCard(k=" in repr(card) and card.to_dict()["dim"] == D


def test_card_residual_diagonal_is_exact_on_coordinates(problem):
    model, data, op, H = problem
    card = build_card(op, 3, residual_diag="exact")
    assert card.k == 3
    for j in (0, 7, op.shape[0] - 1):
        e = torch.zeros(op.shape[0], dtype=torch.float64)
        e[j] = 1
        assert card.risk(e) == pytest.approx(float(H[j, j]), rel=1e-9, abs=1e-14)
    top, res = card.risk_parts(torch.ones(op.shape[0], dtype=torch.float64))
    assert math.isfinite(top) and math.isfinite(res)


def test_card_eigsh_and_hessian_diag_paths(problem):
    model, data, op, H = problem
    vals = torch.linalg.eigvalsh(H).flip(0)
    card = build_card(op, 4, hessian_diag=torch.diagonal(H), method="eigsh", trace=1.5, trace_stderr=0.1)
    torch.testing.assert_close(card.eigvals, vals[:4], rtol=1e-8, atol=1e-10)
    exact = build_card(op, 4, residual_diag="exact")
    torch.testing.assert_close(card.residual_diag, exact.residual_diag, rtol=1e-7, atol=1e-9)
    assert card.provenance["eig_method"] == "scipy-eigsh" and card.trace == 1.5
    auto = build_card(op, 3)  # lanczos_topk when diag.curvature.lanczos is importable, else eigsh
    assert auto.provenance["eig_method"] in ("lanczos", "scipy-eigsh")
    torch.testing.assert_close(auto.eigvals, vals[:3], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close((auto.eigvecs.T @ H @ auto.eigvecs), torch.diag(vals[:3]), rtol=1e-6, atol=1e-8)
    plain = build_card(DenseOperator(H), 2, method="eigsh")
    assert plain.param_names == ("flat",) and plain.residual_diag.abs().sum() == 0
    with pytest.raises(TvdiagError):
        build_card(op, 0)
    with pytest.raises(TvdiagError):
        build_card(op, 2, residual_diag="approx")


def test_card_save_load_roundtrip_and_corruption(problem, tmp_path):
    model, data, op, H = problem
    card = build_card(op, 5, residual_diag="exact", provenance={"target": "toy"})
    path = tmp_path / "cards" / "toy.safetensors"
    card.save(path)
    assert sorted(os.listdir(path.parent)) == ["toy.safetensors"]  # no temp file left behind
    back = HessianCard.load(path)
    torch.testing.assert_close(back.eigvecs, card.eigvecs, rtol=0, atol=0)
    torch.testing.assert_close(back.residual_diag, card.residual_diag, rtol=0, atol=0)
    assert back.param_names == op.param_names and back.param_shapes == op.param_shapes
    assert back.provenance == card.provenance and back.trace == card.trace
    tau = torch.randn(op.shape[0], dtype=torch.float64)
    assert back.risk(tau) == card.risk(tau)

    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError):
        HessianCard.load(tmp_path / "trunc.safetensors")
    with pytest.raises(ArtifactError):
        HessianCard.load(tmp_path / "garbage.safetensors")
    with pytest.raises(ArtifactError, match="does not exist"):
        HessianCard.load(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ArtifactError, match="not a Hessian card"):
        HessianCard.load(tmp_path / "other.safetensors")
    bad = HessianCard(eigvals=card.eigvals.clone(), eigvecs=card.eigvecs, residual_diag=card.residual_diag,
                      param_names=card.param_names, param_shapes=card.param_shapes, provenance=card.provenance)
    bad.eigvals[0] = float("nan")
    bad.save(tmp_path / "nan.safetensors")
    with pytest.raises(ArtifactError, match="NaN"):
        HessianCard.load(tmp_path / "nan.safetensors")
    with pytest.raises(BaseMismatchError):
        HessianCard(eigvals=card.eigvals, eigvecs=card.eigvecs[:-1], residual_diag=card.residual_diag,
                    param_names=card.param_names, param_shapes=card.param_shapes)


def test_quadratic_check_is_second_order_accurate(problem):
    model, data, op, H = problem
    tau = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ts = (1e-3, 1e-2, 1e-1)
    rows = quadratic_check(model, data, op.unflatten(tau), ts=ts, engine="fwd-rev")
    assert [r.t for r in rows] == list(ts)
    g = HessianOperator(model, data, engine="fwd-rev").gradient()
    R = float(tau @ H @ tau)
    for r in rows:
        assert r.first_order == pytest.approx(r.t * float(g @ tau), rel=1e-9)
        assert r.second_order == pytest.approx(0.5 * r.t ** 2 * R, rel=1e-9)
        assert r.predicted == pytest.approx(r.first_order + r.second_order, rel=1e-12)
        assert set(r.to_dict()) >= {"t", "measured", "predicted", "rel_error", "holds"}
    # the remainder is O(t^3), so the relative error of the full model is O(t)
    assert rows[0].rel_error < 1e-3 and rows[0].holds
    assert rows[0].rel_error < rows[1].rel_error < rows[2].rel_error
    # the measured change matches the loss evaluated directly
    X = torch.cat([x for x, _ in data]); Y = torch.cat([y for _, y in data])
    shifted = {n: p + 1e-1 * tau_p for (n, p), tau_p in zip(model.named_parameters(), op.unflatten(tau).values())}
    L = lambda params: float(nn.functional.cross_entropy(torch.func.functional_call(model, params, (X,)), Y).detach())  # noqa: E731
    assert rows[2].measured == pytest.approx(L(shifted) - L(dict(model.named_parameters())), rel=1e-9)


def test_rank_agreement_hand_values():
    # one adjacent swap among 4: Spearman 1 - 6*2/(4*15) = 0.8, Kendall (5-1)/6 = 2/3
    out = rank_agreement([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 40.0, 30.0])
    assert out["spearman"] == pytest.approx(0.8) and out["kendall"] == pytest.approx(2 / 3)
    assert rank_agreement([1, 2, 3], [3, 2, 1]) == {"spearman": pytest.approx(-1.0), "kendall": pytest.approx(-1.0)}
    assert math.isnan(rank_agreement([1.0], [2.0])["spearman"])
    with pytest.raises(BaseMismatchError):
        rank_agreement([1, 2], [1, 2, 3])


def test_risk_result():
    r = RiskResult(exact=2.0, diag=3.0)
    assert r.to_dict() == {"exact": 2.0, "diag": 3.0, "card": None, "diag_stderr": None, "g_tau": None}
    assert r.loss_increase(0.5) == pytest.approx(0.25) and r.loss_increase(1.0, "card") is None
    # with its first-order term: 0.5·(−0.2) + ½·0.25·2 = 0.15
    assert RiskResult(exact=2.0, g_tau=-0.2).loss_increase(0.5) == pytest.approx(0.15)
    assert "exact=2" in repr(r)
    with pytest.raises(TvdiagError):
        r.loss_increase(1.0, "hvp")
