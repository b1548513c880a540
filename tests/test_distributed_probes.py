"""Probes split over 2 gloo processes give the single-process estimate with the same seeds."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diag.curvature.exact import exact_diagonal
from diag.curvature.hutchinson import hutchinson_diagonal, hutchinson_trace
from diag.curvature.operators import DenseOperator
from diag.runtime.distributed import process_group

D, N_PROBES, SEED = 24, 13, 4  # 13 probes: the last round is split unevenly


def _matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    X = torch.randn(D, D, generator=g, dtype=torch.float64)
    return (X + X.T) / 2


def _weights() -> torch.Tensor:
    """Two functionals w_j of the diagonal (their per-probe scalars d_kᵀw_j)."""
    return torch.rand(D, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    with process_group(f"file://{init_file}", rank=rank, world_size=world, backend="gloo"):
        A = DenseOperator(_matrix())
        t = hutchinson_trace(A, num_matvecs=N_PROBES, seed=SEED, block_size=2)
        d = hutchinson_diagonal(A, num_matvecs=N_PROBES, seed=SEED, block_size=2, functionals=_weights())
        e = exact_diagonal(A, chunk_size=5)
        save_file({"trace": torch.tensor([t.value, t.stderr, float(t.n_matvecs)], dtype=torch.float64),
                   "probe_values": t.probe_values, "diag_mean": d.mean, "diag_stderr": d.stderr,
                   "diag_total": torch.tensor([d.total, d.total_stderr], dtype=torch.float64),
                   "exact": e.mean, "functionals": d.probe_functionals}, os.path.join(out_dir, f"rank{rank}.safetensors"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    for k in r0:  # every rank holds the same estimate
        assert torch.equal(r0[k], r1[k]), k
    A = DenseOperator(_matrix())
    t = hutchinson_trace(A, num_matvecs=N_PROBES, seed=SEED)
    d = hutchinson_diagonal(A, num_matvecs=N_PROBES, seed=SEED, functionals=_weights())
    # per-probe values and the trace: same probes in the same order
    torch.testing.assert_close(r0["probe_values"], t.probe_values, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(r0["trace"], torch.tensor([t.value, t.stderr, N_PROBES], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r0["diag_mean"], d.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r0["diag_stderr"], d.stderr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r0["diag_total"], torch.tensor([d.total, d.total_stderr], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r0["exact"], _matrix().diagonal(), rtol=0, atol=1e-14)
    torch.testing.assert_close(r0["functionals"], d.probe_functionals, rtol=1e-12, atol=1e-12)
