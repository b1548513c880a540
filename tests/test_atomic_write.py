"""One atomic writer: a failed write keeps the old file, a killed writer's temporary is swept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from diag.table import write_table
from train.errors import StoreError
from train.tensorio import atomic_write, atomic_write_bytes, sweep_stale_tmp

ROOT = Path(__file__).resolve().parents[1]


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    atomic_write_bytes(path, b"old\n")

    def half_then_fail(fh):
        fh.write(b"new, half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    with pytest.raises(StoreError, match="Cannot write"):
        atomic_write_bytes(tmp_path / "missing-folder" / "x.bin", b"x")


def test_a_killed_writer_leaves_a_temporary_the_sweep_recognises(tmp_path):
    """The writer process dies inside the write: its temporary stays, and the sweep removes it (pid gone)."""
    path = tmp_path / "pairs.csv"
    write_table(pd.DataFrame({"a": [1]}), path)  # the study table's writer goes through the same helper
    code = ("import os, sys; from pathlib import Path; from train.tensorio import atomic_write\n"
            "def die(fh):\n    fh.write(b'partial'); fh.flush(); os._exit(9)\n"
            f"atomic_write(Path({str(path)!r}), die)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 9, proc.stderr
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].name.startswith(".pairs.csv.")
    assert path.read_text() == "a\n1\n"  # the table is the old one
    assert sweep_stale_tmp(tmp_path) == left and not left[0].exists()
