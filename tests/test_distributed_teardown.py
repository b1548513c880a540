"""Leaving a process group: a failing worker ends the command with its own error, and never leaves a peer waiting.

The healthy path (barrier, then destroy) is what every other multi-process test runs through
:func:`diag.runtime.distributed.process_group`; ``scripts/stress_distributed.sh`` repeats
them under load to show that teardown never aborts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diag.runtime.context import Context
from diag.runtime.distributed import barrier, is_distributed, rank_and_world
from diag.runtime.workers import run_workers
from train.errors import TvdiagError

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _rank1_fails(ctx) -> str:
    """Rank 1 raises a tvdiag error at once; rank 0 waits for it at a barrier it will never reach."""
    rank, _ = rank_and_world()
    if rank == 1:
        raise TvdiagError("rank 1 cannot read its input")
    barrier()  # without the launcher stopping this rank, it would wait out the group's 12-hour timeout
    return "unreachable"


def _all_succeed(ctx, delay: float) -> list[int]:
    """Rank 1 finishes ``delay`` seconds after rank 0: rank 0 waits for it at the closing barrier."""
    rank, world = rank_and_world()
    if rank == 1:
        time.sleep(delay)
    return [rank, world, int(is_distributed())]


def test_failing_worker_raises_its_own_message_and_stops_its_peer(tmp_path):
    start = time.perf_counter()
    with pytest.raises(TvdiagError, match="^rank 1 cannot read its input$"):
        run_workers(_rank1_fails, Context(tmp_path, preset="smoke", progress=False), (), 2)
    assert time.perf_counter() - start < 120


def test_workers_wait_for_the_slowest_before_leaving(tmp_path):
    result = run_workers(_all_succeed, Context(tmp_path, preset="smoke", progress=False), (1.0,), 2)
    assert result == [0, 2, 1]  # worker 0's result, from inside a group of two
    assert not is_distributed()  # the parent never joined a group


def test_zoo_worker_error_is_exit_2_and_one_stderr_line(tmp_path):
    """``diag zoo --workers 2``: mnist's head is a file tvdiag did not write, so the mnist worker refuses it.

    The gtsrb worker builds its domain and then waits for the mnist worker at the gather; the
    command must still end, with exit 2 and the refusal as its one stderr line.
    """
    store = tmp_path / "store"
    head = Context(store, preset="smoke").store.head_path("mnist")
    head.parent.mkdir(parents=True, exist_ok=True)
    save_file({"head": torch.zeros(10, 4)}, str(head))  # no tvdiag provenance: the user's file
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "diag.cli", "zoo", "--preset", "smoke", "--domains", "gtsrb", "mnist",
           "--workers", "2", "--store", str(store), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    assert "was not written by tvdiag" in lines[0] and "mnist" in lines[0] and "--rebuild mnist" in lines[0]
    assert head.read_bytes()  # the user's file is still there
