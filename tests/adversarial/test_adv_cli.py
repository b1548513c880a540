"""The CLI's failure contract: one line for expected and unexpected errors, no warnings before
the error line, strict JSON, no network for `--pretrained`, kill -9 and concurrent writers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import diag.commands.transfer as transfer_cmd
from diag.commands.output import emit_json
from tests._smoke import BACKBONE_ID
from tests.adversarial._helpers import common, refused, run
from train.errors import TvdiagError

ROOT = Path(__file__).resolve().parents[2]
TRANSFER = ["transfer", "--source", "mnist", "--target", "animals"]


def _strict(text: str):
    def bad(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(smoke, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(transfer_cmd, "run_transfer", boom)
    code, out, err = run(capsys, [*TRANSFER, *common(smoke.root)])
    assert code == 3 and out == ""
    assert err.strip().splitlines() == ["diag transfer: internal error: RuntimeError: kaput second line "
                                        "(rerun with --debug for the traceback)"]
    code, _, err = run(capsys, [*TRANSFER, "--debug", *common(smoke.root)])
    assert code == 3 and "Traceback" in err


def test_warnings_never_precede_the_error_line(smoke, capsys, monkeypatch):
    def warn_then_fail(args):
        warnings.warn("torch.something is deprecated", FutureWarning)
        warnings.warn("a user warning", UserWarning)
        logging.getLogger("train.zoo").warning("a log line")
        raise TvdiagError("the real problem")

    monkeypatch.setattr(transfer_cmd, "run_transfer", warn_then_fail)
    code, out, err = run(capsys, [*TRANSFER, *common(smoke.root)])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["diag transfer: error: the real problem"]


def test_non_finite_result_is_an_error_not_bare_nan(capsys):
    with pytest.raises(TvdiagError, match="'rows.1.ermse'"):
        emit_json({"rows": [{"ermse": 0.1}, {"ermse": float("nan")}]})
    with pytest.raises(TvdiagError, match="'x'"):
        emit_json({"x": float("inf")})
    assert capsys.readouterr().out == ""


def test_json_success_output_parses_strictly(smoke, capsys):
    code, out, err = run(capsys, ["zoo", "--domains", "mnist", *common(smoke.root)])
    assert code == 0, err
    assert _strict(out)["zero_shot_accuracy"].keys() == {"mnist"}


def test_pretrained_is_never_downloaded(tmp_path, capsys, monkeypatch):
    """`--pretrained openai` used to retry the network for ~50 s with 46 lines of stderr."""
    import huggingface_hub.constants as hf

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    start = time.perf_counter()
    line = refused(capsys, ["zoo", "--backbone", "ViT-B-32", "--pretrained", "openai", *common(tmp_path / "s")],
                   "not in the local cache", tmp_path)
    assert time.perf_counter() - start < 1.0
    assert str(tmp_path / "hf") in line and "never downloads" in line
    refused(capsys, ["zoo", "--backbone", "ViT-B-32", "--pretrained", "nosuchtag", *common(tmp_path / "s")],
            "'nosuchtag'", tmp_path)


# ------------------------------------------------------------ processes on the smoke preset
def _cli(store: Path) -> list[str]:
    return [sys.executable, "-m", "diag.cli", "zoo", "--domains", "mnist", "--store", str(store), "--preset",
            "smoke", "--quiet"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _without_mnist(smoke, dst: Path) -> tuple[Path, dict]:
    """A store copy without mnist's θ_ft, φ and θ_ft*; returns (copy, the original mnist files' bytes)."""
    shutil.copytree(smoke.root, dst)
    folder = dst / BACKBONE_ID
    removed = [*(folder / "vectors" / "mnist").glob("*.safetensors"),
               folder / "attributions" / "mnist-kernelshap.safetensors"]
    original = {p.relative_to(folder).as_posix(): p.read_bytes() for p in removed}
    for p in removed:
        p.unlink()
    return dst, original


def _files(store: Path, names) -> dict:
    return {n: (store / BACKBONE_ID / n).read_bytes() for n in names}


def test_kill_9_then_resume_gives_identical_bytes(smoke, tmp_path):
    store, original = _without_mnist(smoke, tmp_path / "store")
    proc = subprocess.Popen(_cli(store), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ft = store / BACKBONE_ID / "vectors" / "mnist" / "ft.safetensors"
    deadline = time.monotonic() + 60
    while not ft.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cli(store), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _files(store, original) == original
    assert not list(store.rglob("*.tmp"))


def test_two_concurrent_writers_give_identical_bytes(smoke, tmp_path):
    store, original = _without_mnist(smoke, tmp_path / "store")
    procs = [subprocess.Popen(_cli(store), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    assert _files(store, original) == original
    assert not list(store.rglob("*.tmp"))
