"""Data-parallel HVPs: two CPU processes (gloo) give the single-process product."""

import os

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from diag.curvature import GGNOperator, HessianOperator
from diag.runtime.distributed import process_group, rank_and_world

WORLD = 2


def make_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    # unequal batch sizes and an odd batch count: rank 0 gets 3 batches, rank 1 gets 2
    data = [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in (5, 3, 7, 2, 6)]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    return model, data, v


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    with process_group(f"file://{init_file}", rank=rank, world_size=WORLD, backend="gloo"):
        model, data, v = make_problem()
        assert rank_and_world() == (rank, WORLD)
        sharded = HessianOperator(model, data, engine="fwd-rev", shard=True)
        own = HessianOperator(model, data[rank::WORLD], engine="double-backward")  # user passes the shard
        local = HessianOperator(model, data[rank::WORLD], engine="double-backward", data_parallel=False)
        ggn = GGNOperator(model, data, shard=True)
        out = {
            "sharded": sharded @ v,
            "own": own @ v,
            "local": local @ v,
            "ggn": ggn @ v,
            "n": torch.tensor([sharded.num_samples, local.num_samples]),
            "dp": torch.tensor([int(sharded.data_parallel), int(local.data_parallel)]),
        }
        save_file(out, os.path.join(out_dir, f"rank{rank}.safetensors"))


def test_two_process_hvp_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, data, v = make_problem()
    ref = HessianOperator(model, data, engine="fwd-rev") @ v
    ref_ggn = GGNOperator(model, data) @ v
    N = sum(len(y) for _, y in data)
    for rank in range(WORLD):
        out = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        torch.testing.assert_close(out["sharded"], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["own"], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["ggn"], ref_ggn, rtol=1e-10, atol=1e-12)
        assert out["n"].tolist() == [N, sum(len(y) for _, y in data[rank::WORLD])]
        assert out["dp"].tolist() == [1, 0]
        # without the all-reduce a rank sees only its own shard, which differs
        local_ref = HessianOperator(model, data[rank::WORLD], engine="fwd-rev") @ v
        torch.testing.assert_close(out["local"], local_ref, rtol=1e-10, atol=1e-12)
        assert (out["local"] - ref).abs().max() > 1e-3
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert torch.equal(r0["sharded"], r1["sharded"])  # every rank holds the same product
