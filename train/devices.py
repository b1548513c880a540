"""The one place for device logic: which device a run uses, bf16 autocast, moving results home.

``--device`` takes ``auto | cpu | cuda | cuda:N | mps``. ``auto`` picks CUDA, then MPS, then
the CPU, and says which once per process (one stderr line, e.g. ``tvdiag: device auto → cpu
(no CUDA or MPS)``). A device that was asked for by name and is not there is an error (exit 2
in the CLI), never a silent fall back to the CPU.

Precision: parameters, optimiser state and every curvature product stay in fp32/fp64 on every
device. ``bf16`` only wraps forwards in :func:`autocast` (fine-tuning and Kernel SHAP) and is
refused on anything but CUDA (:func:`check_bf16`). Artifacts are always written from CPU
tensors (:func:`cpu_state`), so a CPU run writes the same bytes whether the device was ``cpu``
or ``auto``.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Mapping

import torch

from train.errors import TvdiagError, UnknownNameError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CUDA_INDEX = re.compile(r"cuda:(\d+)")

_said: set[str] = set()
_held: list[list[str]] = []


def say_once(message: str) -> None:
    """Write ``tvdiag: <message>`` to stderr once per process (held while :func:`hold_notices` is open)."""
    if message in _said:
        return
    _said.add(message)
    line = f"tvdiag: {message}"
    if _held:
        _held[-1].append(line)
    else:
        print(line, file=sys.stderr)


@contextlib.contextmanager
def hold_notices() -> Iterator[list[str]]:
    """Collect :func:`say_once` lines instead of printing them (the CLI prints them after a success)."""
    lines: list[str] = []
    _held.append(lines)
    try:
        yield lines
    finally:
        _held.remove(lines)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _auto() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        say_once(f"device auto → {device} ({torch.cuda.get_device_name(device)})")
        return device
    if _mps_available():
        say_once("device auto → mps (no CUDA)")
        return torch.device("mps")
    say_once("device auto → cpu (no CUDA or MPS)")
    return torch.device("cpu")


def _unavailable(spec: str, why: str) -> TvdiagError:
    return TvdiagError(f"Device '{spec}' was requested but {why}; use --device cpu (or auto, which picks "
                       "CUDA, then MPS, then the CPU)")


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The ``torch.device`` of ``spec``: ``auto`` (or None), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Raises:
        UnknownNameError: ``spec`` is none of the choices (the message lists them).
        TvdiagError: CUDA or MPS was asked for by name and is not available, or ``cuda:N``
            names a GPU that does not exist.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return _auto()
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise _unavailable(text, "MPS is not available on this machine")
        return torch.device("mps")
    match = _CUDA_INDEX.fullmatch(text)
    if text == "cuda" or match:
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise _unavailable(text, why)
        index = int(match.group(1)) if match else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise _unavailable(text, f"only {torch.cuda.device_count()} CUDA device(s) exist (cuda:0 …)")
        return torch.device("cuda", index)
    raise UnknownNameError(f"Unknown device '{spec}'. Available: {', '.join(DEVICE_CHOICES)}")


def check_bf16(device: torch.device, enabled: bool) -> bool:
    """``enabled``, after refusing bf16 autocast on a device that is not CUDA."""
    if enabled and torch.device(device).type != "cuda":
        raise TvdiagError(f"--bf16 needs a CUDA device, the run's device is '{device}'; drop --bf16 "
                          "(bf16 autocast is offered for CUDA only)")
    return bool(enabled)


def autocast(device: torch.device | str, enabled: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast of forwards on CUDA when ``enabled`` (checked by :func:`check_bf16`); else a no-op.

    For fine-tuning and Kernel SHAP forwards only: curvature never runs under it (fp32/fp64).
    """
    device = torch.device(device)
    if not check_bf16(device, enabled):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict detached and on the CPU (what every artifact is written from)."""
    return {k: v.detach().to("cpu") for k, v in state.items()}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (for timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
