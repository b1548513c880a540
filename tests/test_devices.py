"""Devices: resolve_device semantics, --device/--bf16 at the CLI boundary, byte-identical artifacts, device_check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _smoke import BACKBONE_ID, one_thread
from diag.cli import main
from train.devices import autocast, check_bf16, hold_notices, resolve_device, say_once
from train.errors import TvdiagError, UnknownNameError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@no_cuda
def test_auto_is_cpu_without_gpu_and_named_devices_resolve():
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        pytest.skip("MPS machine")
    assert resolve_device(None) == resolve_device("auto") == resolve_device("AUTO") == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda0", "tpu", ""])
def test_bad_spec_names_the_choices(spec):
    with pytest.raises(UnknownNameError) as err:
        resolve_device(spec)
    assert f"'{spec}'" in str(err.value) and "auto, cpu, cuda, cuda:N, mps" in str(err.value)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_requested_without_gpu_is_an_error_not_a_fallback(spec):
    with pytest.raises(TvdiagError, match=f"Device '{spec}' was requested"):
        resolve_device(spec)


def test_notice_is_said_once_and_held_lines_are_returned(capsys):
    with hold_notices() as held:
        say_once("device test-notice → nowhere")
        say_once("device test-notice → nowhere")
    assert held == ["tvdiag: device test-notice → nowhere"] and capsys.readouterr().err == ""
    say_once("device test-notice → nowhere")  # already said in this process
    assert capsys.readouterr().err == ""


def test_bf16_only_on_cuda():
    with pytest.raises(TvdiagError, match="--bf16 needs a CUDA device"):
        check_bf16(torch.device("cpu"), True)
    with pytest.raises(TvdiagError, match="--bf16"):
        autocast("cpu", True)
    with autocast("cpu", False):  # a no-op
        assert not torch.is_autocast_enabled("cpu")
    assert check_bf16(torch.device("cpu"), False) is False


@no_cuda
@pytest.mark.parametrize("argv, needle", [
    (["--device", "cuda"], "Device 'cuda' was requested"),
    (["--device", "gpu"], "Available: auto, cpu, cuda, cuda:N, mps"),
    (["--bf16"], "--bf16 needs a CUDA device"),
    (["--device", "cpu", "--bf16"], "--bf16 needs a CUDA device"),
])
def test_cli_refuses_in_one_line_with_exit_2(capsys, tmp_path, argv, needle):
    code, out, err = _cli(capsys, "similarity", "--store", str(tmp_path / "store"), "--quiet", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "store").exists()


def test_device_option_on_every_subcommand():
    from diag.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        options = {s for a in parser._actions for s in a.option_strings}
        assert {"--device", "--bf16"} <= options, name


def _artifacts(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def _smoke_cut():
    """The smoke preset cut further (16 pool images per domain, 16 train images): seconds per build."""
    from dataclasses import replace

    from train.loop import OptimConfig
    from train.pretrain import PretrainConfig
    from train.zoo import preset

    return replace(preset("smoke"), pretrain=PretrainConfig(epochs=1, batch_size=32, max_per_domain=16),
                   ft=OptimConfig(steps=3, lr=1e-3, warmup=1, batch_size=16), max_train=16, max_val=8, shap_test=8,
                   max_test=8)


def test_device_cpu_and_default_write_identical_zoo_artifacts(tmp_path):
    """θ_base, head, θ_ft, φ and θ_ft* of one domain built with device="cpu" and with the default: same bytes."""
    from train.store import Store
    from train.zoo import Zoo

    with one_thread():
        for folder, device in (("a", "cpu"), ("b", None)):
            Zoo(Store(tmp_path / folder, BACKBONE_ID), _smoke_cut(), progress=False, device=device).build(["mnist"])
    built = _artifacts(tmp_path / "a")
    assert {f"{BACKBONE_ID}/base.safetensors", f"{BACKBONE_ID}/vectors/mnist/ftx-a0.8.safetensors"} <= set(built), built
    assert built == _artifacts(tmp_path / "b")


def test_zoo_refuses_bf16_on_cpu(tmp_path):
    from train.store import Store
    from train.zoo import Zoo

    with pytest.raises(TvdiagError, match="--bf16 needs a CUDA device"):
        Zoo(Store(tmp_path, BACKBONE_ID), _smoke_cut(), device="cpu", bf16=True)


def test_device_check_cpu_smoke_prints_one_json_line(capsys):
    from diag.bench.device_check import main as check

    with one_thread():
        assert check(["--cpu-smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    keys = ("finetune_images_per_s", "forward_images_per_s", "kernelshap_images_per_s", "kernelshap_forward_ratio",
            "hvp_seconds", "grad_seconds", "hvp_over_grad", "peak_memory_gb")
    assert record["status"] == "cpu-smoke" and record["device"] == "cpu" and record["kernelshap_samples"] == 64
    assert all(math.isfinite(record[k]) and record[k] > 0 for k in keys), record
    assert record["n_params"] == sum(p.numel() for p in _tiny_visual_params())
    assert record["patches"] == 16


def _tiny_visual_params():
    from train.backbones import create_backbone

    return create_backbone("tiny").clip.visual.parameters()


@no_cuda
def test_device_check_without_gpu_says_so_and_exits_0(capsys):
    from diag.bench.device_check import main as check

    assert check([]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "skipped" and "no CUDA GPU" in record["reason"]
