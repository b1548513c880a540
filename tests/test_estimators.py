"""Estimators against dense float64 references: diagonal, trace, Hutch++, Lanczos, SLQ, resume."""

from __future__ import annotations

import math

import pytest
import torch

from diag.curvature.checkpoint import ProbeCheckpoint
from diag.curvature.data_variance import trace_with_data_variance
from diag.curvature.exact import exact_diagonal, exact_trace
from diag.curvature.hutchinson import hutchinson_diagonal, hutchinson_trace
from diag.curvature.hutchpp import hutchpp_trace
from diag.curvature.lanczos import lanczos_topk, slq_density
from diag.curvature.operators import DenseOperator, HessianOperator
from diag.curvature.probes import probe_seed, rademacher
from train.errors import ArtifactError, DataError


def sym(D: int, seed: int = 0, psd: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(D, D, generator=g, dtype=torch.float64)
    if psd:
        return X @ X.T / D
    return (X + X.T) / 2 + torch.diag(torch.linspace(-1, 3, D, dtype=torch.float64))


# ------------------------------------------------------------------ probes and exact


def test_probe_stream_is_seeded_per_index():
    a = rademacher(100, seed=3, index=7)
    assert torch.equal(a, rademacher(100, seed=3, index=7))
    assert not torch.equal(a, rademacher(100, seed=3, index=8))
    assert set(a.tolist()) == {-1.0, 1.0}
    assert probe_seed(0, 1) != probe_seed(1, 0) and 0 <= probe_seed(2**70, 5) < 2**63


def test_exact_diagonal_and_trace_match_dense():
    H = sym(37)
    A = DenseOperator(H)
    d = exact_diagonal(A, chunk_size=8)  # 37 is not a multiple of 8
    torch.testing.assert_close(d.mean, H.diagonal(), rtol=0, atol=1e-14)
    assert d.n_matvecs == 37 and float(d.stderr.abs().max()) == 0.0
    assert exact_trace(A).value == pytest.approx(float(H.trace()), abs=1e-12)


def test_hutchinson_values_are_the_probe_quadratic_forms():
    H = sym(20)
    A = DenseOperator(H)
    est = hutchinson_trace(A, num_matvecs=12, seed=5)
    manual = torch.stack([rademacher(20, 5, i) @ H @ rademacher(20, 5, i) for i in range(12)])
    torch.testing.assert_close(est.probe_values, manual, rtol=1e-13, atol=1e-13)
    assert est.value == pytest.approx(float(manual.mean()), rel=1e-13)
    assert est.stderr == pytest.approx(float(manual.std()) / math.sqrt(12), rel=1e-10)
    # same seed -> the diagonal total is the same trace estimate; blocks give the same numbers
    diag = hutchinson_diagonal(A, num_matvecs=12, seed=5, block_size=5)
    assert diag.total == pytest.approx(est.value, rel=1e-12)
    assert diag.total_stderr == pytest.approx(est.stderr, rel=1e-10)
    manual_d = torch.stack([rademacher(20, 5, i) * (H @ rademacher(20, 5, i)) for i in range(12)])
    torch.testing.assert_close(diag.mean, manual_d.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diag.stderr, manual_d.std(0) / math.sqrt(12), rtol=1e-9, atol=1e-12)


def test_hutchinson_ci_coverage_band():
    """The 95 % t-interval covers tr(H) and each diagonal entry in ~95 % of seeds."""
    H = sym(16, seed=1)
    A = DenseOperator(H)
    true, dtrue = float(H.trace()), H.diagonal()
    n_seeds, hits, entry_hits = 200, 0, 0.0
    for s in range(n_seeds):
        d = hutchinson_diagonal(A, num_matvecs=20, seed=1000 + s, block_size=20)
        lo, hi = d.ci95()
        hits += lo <= true <= hi
        elo, ehi = d.ci()
        entry_hits += float(((elo <= dtrue) & (dtrue <= ehi)).double().mean())
    assert 0.90 <= hits / n_seeds <= 0.99
    assert 0.90 <= entry_hits / n_seeds <= 0.99


def test_rel_stderr_stopping_rule():
    A = DenseOperator(sym(30, seed=2, psd=True))
    est = hutchinson_trace(A, rel_stderr=0.02, seed=0)
    assert est.converged and est.rel_stderr <= 0.02 and est.n_matvecs >= 8
    # a diagonal matrix has zero probe variance: stop at the minimum, not after 2 probes
    D = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
    e2 = hutchinson_trace(D, rel_stderr=0.1, seed=0)
    assert e2.n_matvecs == 8 and e2.value == pytest.approx(55.0) and e2.stderr == 0.0
    # an unreachable target stops at max_matvecs and says so
    e3 = hutchinson_trace(A, rel_stderr=1e-9, max_matvecs=20)
    assert e3.n_matvecs == 20 and e3.converged is False


# ------------------------------------------------------------------ resume


class Interrupt(Exception):
    pass


def _stop_after(n):
    def cb(state):
        if state.n >= n:
            raise Interrupt
    return cb


@pytest.mark.parametrize("fn", [hutchinson_trace, hutchinson_diagonal])
def test_resume_gives_the_uninterrupted_result(tmp_path, fn):
    A = DenseOperator(sym(25, seed=4))
    full = fn(A, num_matvecs=30, seed=9, block_size=2)
    ck = ProbeCheckpoint(tmp_path / "run.safetensors", every=4)
    with pytest.raises(Interrupt):
        fn(A, num_matvecs=30, seed=9, block_size=2, checkpoint=ck, callback=_stop_after(14))
    resumed = fn(A, num_matvecs=30, seed=9, block_size=2, checkpoint=ck)
    if fn is hutchinson_trace:
        assert resumed.value == full.value and resumed.stderr == full.stderr
        assert torch.equal(resumed.probe_values, full.probe_values)
    else:
        assert torch.equal(resumed.mean, full.mean) and torch.equal(resumed.stderr, full.stderr)
        assert resumed.total == full.total
    assert resumed.n_matvecs == 30
    with pytest.raises(ArtifactError, match="seed"):
        fn(A, num_matvecs=30, seed=10, block_size=2, checkpoint=ck)


def test_resume_counts_only_new_products(tmp_path):
    calls = []

    class Counting(DenseOperator):
        def _matmat(self, V):
            calls.append(V.shape[1])
            return super()._matmat(V)

    A = Counting(sym(10))
    path = tmp_path / "t.safetensors"
    hutchinson_trace(A, num_matvecs=6, checkpoint=path)
    calls.clear()
    est = hutchinson_trace(A, num_matvecs=10, checkpoint=path)
    assert sum(calls) == 4 and est.n_matvecs == 10


# ------------------------------------------------------------------ Hutch++ and data variance


def test_hutchpp_exact_for_low_rank_and_unbiased():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(40, 3, generator=g, dtype=torch.float64)
    L = U @ torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ U.T
    est = hutchpp_trace(DenseOperator(L), num_matvecs=15, seed=1)
    assert est.value == pytest.approx(float(L.trace()), rel=1e-10) and est.stderr < 1e-8
    assert est.n_matvecs == 15
    H = sym(30, seed=5, psd=True)
    vals = [hutchpp_trace(DenseOperator(H), 12, seed=s).value for s in range(100)]
    t = torch.tensor(vals)
    assert abs(float(t.mean()) - float(H.trace())) < 4 * float(t.std()) / math.sqrt(100)


def test_trace_with_data_variance_separates_sources():
    # diagonal batch matrices: zero probe variance, so all spread is data variance
    traces = [10.0, 12.0, 15.0, 9.0]
    mats = [torch.diag(torch.full((8,), t / 8, dtype=torch.float64)) for t in traces]
    r = trace_with_data_variance(DenseOperator, mats, num_matvecs=8, weights=[1, 1, 1, 1])
    assert r.value == pytest.approx(sum(traces) / 4)
    assert r.probe_std == 0.0
    assert r.data_std == pytest.approx(float(torch.tensor(traces, dtype=torch.float64).std()))
    # identical batches: the spread is pure probe noise, data variance ~ 0
    H = sym(20, seed=3)
    r2 = trace_with_data_variance(DenseOperator, [H] * 6, num_matvecs=30)
    assert r2.probe_std > 0 and r2.data_std < 2 * r2.probe_std
    assert r2.n_matvecs == 180 and r2.n_batches == 6
    with pytest.raises(DataError):
        trace_with_data_variance(DenseOperator, [H], num_matvecs=4)


def test_hutchpp_block_fits_memory():
    """The block shrinks to fit the memory, the estimate does not change; too little memory is a clear error."""
    from diag.curvature.hutchpp import fitting_block
    from train.errors import TvdiagError

    H = sym(40, seed=5)
    wide = hutchpp_trace(DenseOperator(H), num_matvecs=30, seed=2, block_size=8)
    narrow = hutchpp_trace(DenseOperator(H), num_matvecs=30, seed=2, block_size=1)
    assert narrow.value == pytest.approx(wide.value, rel=1e-12) and narrow.stderr == pytest.approx(wide.stderr)
    gib = 2**30
    assert fitting_block(88_000_000, 8, 8, 64 * gib) == 8       # ViT-B/32, 24 probes: 8 + 3·8 columns of 0.66 GiB fit in half of 64 GiB
    assert fitting_block(88_000_000, 8, 8, 24 * gib) == 3       # half of 24 GiB holds 18 columns: 8 + 3·3
    with pytest.raises(TvdiagError, match="fewer probes"):
        fitting_block(88_000_000, 33, 8, 24 * gib)            # 100 probes: the sketch alone does not fit


# ------------------------------------------------------------------ Lanczos and SLQ


def test_lanczos_top5_matches_eigh():
    H = sym(60, seed=7)
    evals = torch.linalg.eigvalsh(H)
    r = lanczos_topk(DenseOperator(H), k=5, num_iters=60, seed=0)
    torch.testing.assert_close(r.eigvals, evals.flip(0)[:5], rtol=1e-10, atol=1e-10)
    assert float(r.residuals.max()) <= 1e-8 * float(r.eigvals.abs().max())  # the tol=1e-8 early stop
    manual = (H @ r.eigvecs - r.eigvecs * r.eigvals).norm(dim=0)
    torch.testing.assert_close(r.residuals, manual, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(r.eigvecs.T @ r.eigvecs, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    lm = lanczos_topk(DenseOperator(-H), k=3, num_iters=60, which="LM")
    torch.testing.assert_close(lm.eigvals.abs(), evals.abs().sort(descending=True).values[:3], rtol=1e-9, atol=1e-9)


def test_lanczos_residuals_without_kept_products():
    """When the products do not fit, the residuals come from k more products, equal to the kept ones'."""
    from diag.curvature.lanczos import keeps_products

    H = sym(80, seed=3)
    kept = lanczos_topk(DenseOperator(H), k=4, num_iters=30, seed=1, tol=0.0, keep_products=True)
    lean = lanczos_topk(DenseOperator(H), k=4, num_iters=30, seed=1, tol=0.0, keep_products=False)
    assert torch.equal(lean.eigvals, kept.eigvals) and torch.equal(lean.eigvecs, kept.eigvecs)
    assert lean.n_matvecs == kept.n_matvecs + 4
    torch.testing.assert_close(lean.residuals, kept.residuals, rtol=1e-6, atol=1e-12)
    manual = (H @ lean.eigvecs - lean.eigvecs * lean.eigvals).norm(dim=0)
    torch.testing.assert_close(lean.residuals, manual, rtol=1e-9, atol=1e-13)
    # ViT-B/32 size, 40 steps: basis + products = 56 GB, kept only with ≥ 112 GB free
    assert not keeps_products(40, 88_000_000, "cpu", free_bytes=24 * 2**30)
    assert keeps_products(40, 88_000_000, "cpu", free_bytes=120 * 2**30)


def test_lanczos_early_stop_residuals_are_honest():
    H = torch.diag(torch.tensor([100.0, 50.0] + [1.0] * 198, dtype=torch.float64))
    r = lanczos_topk(DenseOperator(H), k=2, num_iters=50, tol=1e-10)
    assert r.n_iters < 50  # stopped early (invariant space or tolerance)
    torch.testing.assert_close(r.eigvals, torch.tensor([100.0, 50.0], dtype=torch.float64), rtol=1e-10, atol=0)
    assert float(r.residuals.max()) < 1e-6


def test_lanczos_restarts_after_breakdown():
    """A start vector in an invariant subspace breaks the Krylov space down after one step;
    the run must restart and still find the top-k eigenpairs (it stopped with 1 Ritz value)."""
    evals = torch.tensor([10.0, 9.0, 8.0, 7.0, 3.0, 3.0, 3.0, 1.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64)
    A = DenseOperator(torch.diag(evals))
    v0 = torch.zeros(12, dtype=torch.float64)
    v0[4] = v0[5] = 1.0  # in the eigenspace of the repeated eigenvalue 3
    for k in (1, 3, 5):
        r = lanczos_topk(A, k=k, seed=0, v0=v0)
        torch.testing.assert_close(r.eigvals, evals[:k], rtol=1e-10, atol=1e-10)
        assert float(r.residuals.max()) < 1e-8
        torch.testing.assert_close(r.eigvecs.T @ r.eigvecs, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    # the whole spectrum, repeated eigenvalues included, needs several restarts
    full = lanczos_topk(A, k=12, seed=0, v0=v0)
    torch.testing.assert_close(full.eigvals, evals, rtol=1e-10, atol=1e-10)


def test_lanczos_value_tol_stops_on_the_eigenvalue_error():
    """value_tol stops once r²/gap is small: fewer products, eigenvalue still within the tolerance."""
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.tensor([100.0, 60.0], dtype=torch.float64), torch.rand(78, generator=g, dtype=torch.float64)])
    A = DenseOperator(U @ torch.diag(evals) @ U.T)
    fine = lanczos_topk(A, k=1, seed=0)
    coarse = lanczos_topk(A, k=1, seed=0, value_tol=1e-6)
    assert coarse.n_matvecs < fine.n_matvecs
    assert abs(float(coarse.eigvals[0]) - 100.0) <= 1e-6 * 100.0
    assert float(coarse.residuals[0]) > float(fine.residuals[0])  # the vector is less accurate, honestly reported


def test_hutchinson_blocks_give_the_same_estimate():
    """Block size changes how products are grouped, never the probes or the estimate."""
    A = DenseOperator(sym(30, seed=4))
    a = hutchinson_diagonal(A, num_matvecs=24, seed=2, block_size=1)
    b = hutchinson_diagonal(A, num_matvecs=24, seed=2, block_size=8)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-10, atol=1e-12)
    assert a.total == pytest.approx(b.total, rel=1e-12)


def test_slq_density_integrates_to_one_and_gives_trace():
    H = sym(40, seed=8)
    A = DenseOperator(H)
    s = slq_density(A, num_probes=6, num_iters=40, seed=3)
    assert s.integral() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(s.weights.sum(1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    hut = hutchinson_trace(A, num_matvecs=6, seed=3)
    assert s.trace().value == pytest.approx(hut.value, rel=1e-9)
    # full Krylov space: the nodes are the eigenvalues
    ev = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(s.nodes[0].sort().values, ev, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ on a real Hessian


def test_estimators_on_mlp_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    op = HessianOperator(model, [(x[:10], y[:10]), (x[10:], y[10:])], engine="fwd-rev")
    H = op.to_dense()
    d = exact_diagonal(op, chunk_size=7)
    torch.testing.assert_close(d.mean, H.diagonal(), rtol=1e-10, atol=1e-12)
    r = lanczos_topk(op, k=5, num_iters=op.shape[0])
    torch.testing.assert_close(r.eigvals, torch.linalg.eigvalsh((H + H.T) / 2).flip(0)[:5], rtol=1e-8, atol=1e-10)
    est = hutchinson_trace(op, num_matvecs=30, block_size=10)
    lo, hi = est.ci(0.999)
    assert lo <= float(H.trace()) <= hi
