"""Command-line options: validators of values (argparse ``type=`` functions), the options every
subcommand shares (:func:`add_common`) and the :class:`~diag.runtime.context.Context` they make
(:func:`context_from`), the option blocks several subcommands add (``add_*_option(s)``: each
written once, its default read from :mod:`diag.constants` or
:class:`~diag.features.pair_features.CurvatureSettings`; the curvature options default to the preset's,
:func:`curvature_settings`). The strict JSON printer is :mod:`diag.commands.output`.

Three seeds are named apart: ``--train-seed`` / ``--seeds`` (the zoo's training seeds: θ_ft, φ,
θ_ft* and the controls), ``--probe-seed`` (Hutchinson, Hutch++ and Lanczos probes) and
``--bootstrap-seed`` (bootstrap resamples and permutations). Where ``--seed`` once meant a probe
or bootstrap seed it is refused with one line naming the new option.

Every numeric option is checked at the boundary: finite and in its range, so a value such
as ``--lambda2 nan`` or ``--k 0`` is one clear line and exit code 2 instead of a traceback
or NaN results.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace
from pathlib import Path

from diag.constants import (DEFAULT_MAX_ACC_DROP, LAMBDA_GRID, PAPER_ALPHA, PAPER_LAMBDA1, PAPER_LAMBDA2,
                            PREDICTION_LEVEL)
from diag.curvature.kfac import CARD_FORMS
from diag.features.pair_features import CurvatureSettings, PRESET_CURVATURE
from diag.runtime.context import Context
from diag.runtime.distributed import is_distributed
from diag.runtime.shards import shared_start_time
from diag.runtime.workers import parse_workers
from train.backbones import local_configs
from train.devices import DEVICE_CHOICES
from train.errors import TvdiagError
from train.store import check_name, default_root, VARIANTS
from train.tensorio import check_writable
from train.zoo import PRESETS

SEED_MAX = 2 ** 63


def _number(text: str, kind: type):
    try:
        return kind(text)
    except (TypeError, ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    def parse(text: str) -> float:
        value = _number(text, float)
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if not math.isfinite(value) or low_bad or (hi is not None and value > hi):
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number in {left}{lo}, {hi}]")
        return value

    parse.__name__ = "finite_float"
    return parse


def int_range(lo: int, hi: int):
    """argparse type: an integer in ``[lo, hi]`` (written as digits; ``1e9`` is refused)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer in [{lo}, {hi}]")
        return value

    parse.__name__ = "int_range"
    return parse


def positive_int(hi: int = 10 ** 6):
    """argparse type: an integer in ``[1, hi]``."""
    return int_range(1, hi)


seed = int_range(0, SEED_MAX - 1)
"""argparse type: a seed, 0 ≤ seed < 2**63 (what torch generators accept)."""


def domain_name(text: str) -> str:
    """argparse type: a domain (or other user-given) name, ``[a-z0-9][a-z0-9_-]*``."""
    try:
        return check_name(text)
    except TvdiagError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _writable_target(text: str, folder: bool) -> Path:
    path = Path(text).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    if not folder and path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file path")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    try:
        check_writable(path if folder else path.parent, "Folder")
        _probe_write(path if folder else path.parent)
    except TvdiagError as err:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {err}") from None
    return path


def _probe_write(folder: Path) -> None:
    """Create and delete a temporary file in ``folder``'s nearest existing ancestor (access() lies for root)."""
    import tempfile

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise TvdiagError(f"{probe} is not writable ({err.strerror or err})") from None


def folder_path(text: str) -> Path:
    """argparse type: a folder to read (it may not exist yet, but must not be a file)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return path


def writable_file(text: str) -> Path:
    """argparse type: an output file whose folder exists writable or can be created (checked before compute)."""
    return _writable_target(text, folder=False)


def writable_dir(text: str) -> Path:
    """argparse type: an output folder that is writable or can be created (checked before compute)."""
    return _writable_target(text, folder=True)


# ranges shared by the commands' options
LAMBDA = finite_float(-10.0, 10.0)          # λ1, λ2 (the paper's grid is 0.4 … 1.2)
ALPHA = finite_float(0.0, 1.0)              # α of L_α (eq. 4)
FRACTION = finite_float(0.0, 1.0)           # budgets such as --max-acc-drop
LEVEL = finite_float(0.0, 0.99, lo_open=True)  # --level of prediction intervals
CHECK_T = finite_float(0.0, 10.0, lo_open=True)   # t of the quadratic-model check
PROBES = positive_int(100_000)
N_IMAGES = positive_int(10_000_000)
BATCH = positive_int(65_536)
K = positive_int(1_000)
ITERS = positive_int(10_000)
N_RESAMPLE = positive_int(10_000_000)       # --n-boot, --n-perm
REPEATS = positive_int(1_000)


_CURVATURE_FLAGS = ("n_images", "batch_size", "probes", "k", "card_form")  # the CurvatureSettings fields with an option


def _preset_help(text: str | None, name: str) -> str:
    """``text`` and the option's defaults: ``(default 256; smoke preset 64)`` (the presets with their own)."""
    default = getattr(CurvatureSettings(), name)
    own = [f"{p} preset {getattr(c, name)}" for p, c in PRESET_CURVATURE.items() if getattr(c, name) != default]
    defaults = "; ".join([f"default {default}", *own])
    return f"{text} ({defaults})" if text else f"({defaults})"


def curvature_settings(args: argparse.Namespace, **fields) -> CurvatureSettings:
    """How Hᵀ is estimated for a command line: the preset's :class:`CurvatureSettings`
    (:meth:`CurvatureSettings.for_preset`), with the options given (``--n-images``, ``--batch-size``,
    ``--probes``, ``--k``) and then ``fields`` over them."""
    given = {name: getattr(args, name) for name in _CURVATURE_FLAGS if getattr(args, name, None) is not None}
    return replace(CurvatureSettings.for_preset(args.preset), **{**given, **fields})


def add_lambda_options(parser: argparse.ArgumentParser, *, lambda1: bool = True, repeatable: bool = False) -> None:
    """``--lambda1`` (scale of τ_ftᵀ) and ``--lambda2`` (scale of τ*ˢ) of eq. 8, at the paper's defaults.

    Args:
        lambda1: also add ``--lambda1``.
        repeatable: ``--lambda2`` may repeat (``args.lambda2`` is None when not given) and
            ``--lambda-grid`` adds Figure 3's grid.
    """
    if lambda1:
        parser.add_argument("--lambda1", type=LAMBDA, default=PAPER_LAMBDA1)
    if repeatable:
        parser.add_argument("--lambda2", type=LAMBDA, action="append", default=None,
                            help=f"λ2 (repeatable; default {PAPER_LAMBDA2:g})")
        parser.add_argument("--lambda-grid", action="store_true",
                            help=f"also λ2 = {LAMBDA_GRID[0]:g} … {LAMBDA_GRID[-1]:g} (Figure 3)")
    else:
        parser.add_argument("--lambda2", type=LAMBDA, default=PAPER_LAMBDA2)


def add_alpha_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--alpha``: α of θ_ft* (L_α = α·L_cls + (1 − α)·L_exp, eq. 4), default the paper's."""
    parser.add_argument("--alpha", type=ALPHA, default=PAPER_ALPHA, help=help)


def add_budget_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--max-acc-drop``: the accuracy budget of λ2 and method choices, relative to θ_ftᵀ."""
    parser.add_argument("--max-acc-drop", type=FRACTION, default=DEFAULT_MAX_ACC_DROP, help=help)


def add_level_option(parser: argparse.ArgumentParser) -> None:
    """``--level``: the level of every prediction interval (jackknife+ over held-out targets)."""
    parser.add_argument("--level", type=LEVEL, default=PREDICTION_LEVEL,
                        help=f"level of the prediction intervals, jackknife+ over held-out targets (default "
                             f"{PREDICTION_LEVEL:g})")


def add_domains_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--domains``: a list of domain names (``args.domains`` is None when not given)."""
    parser.add_argument("--domains", nargs="*", default=None, type=domain_name, help=help)


def add_variant_option(parser: argparse.ArgumentParser, default: str | None = "paper",
                       help: str = "θ_ft* variant (default paper; from-ft: τ* against its α = 1 twin, "
                                   "from-ft-raw: the same θ_ft* against θ_ft)") -> None:
    """``--variant``: the θ_ft* variant of a run (:data:`train.store.VARIANTS`)."""
    parser.add_argument("--variant", choices=VARIANTS, default=default, help=help)


def add_study_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--study``: a study folder (``args.study`` is None when not given)."""
    parser.add_argument("--study", default=None, type=folder_path, help=help)


def add_curvature_options(parser: argparse.ArgumentParser, *, batch_size: bool = True, card: bool = True,
                          n_images_help: str | None = None, k_help: str | None = None,
                          keep_probes: bool = False) -> None:
    """How Hᵀ is estimated: ``--n-images`` (and ``--batch-size``), with ``card`` also ``--probes`` (Hutchinson
    probes of diag(Hᵀ)) and ``--k`` (the card's eigenpairs), with ``keep_probes`` also ``--keep-probes`` (the
    store's diagonal of Hᵀ keeps its per-probe diagonals). Not given, each is the preset's
    (:func:`curvature_settings`)."""
    parser.add_argument("--n-images", type=N_IMAGES, default=None, help=_preset_help(n_images_help, "n_images"))
    if batch_size:
        parser.add_argument("--batch-size", type=BATCH, default=None, help=_preset_help(None, "batch_size"))
    if card:
        parser.add_argument("--probes", type=PROBES, default=None,
                            help=_preset_help("Hutchinson probes of diag(Hᵀ)", "probes"))
        parser.add_argument("--k", type=K, default=None, help=_preset_help(k_help or "eigenpairs of the eig card", "k"))
        parser.add_argument("--card-form", default=None, choices=CARD_FORMS,
                            help="the card risk_card and gᵀτ come from: kfac (default; Kronecker factors of the GGN "
                                 "per linear layer, each block scaled to the trace of the Hutchinson diagonal, the "
                                 "diagonal for the rest) or eig (top-k eigenpairs + residual diagonal, a Lanczos run; "
                                 "needed by the project method); scripts/card_fidelity.py measures both")
    if keep_probes:
        parser.add_argument("--keep-probes", action="store_true",
                            help="also keep each Hutchinson probe's diagonal of Hᵀ in the store (probes × parameters "
                                 "float32 per target; default: only the mean, its standard errors and per-probe "
                                 "risks); a cached diagonal without them is rebuilt, same numbers")


class _Renamed(argparse.Action):
    """An option that no longer exists here: using it is one line naming what replaced it."""

    def __init__(self, option_strings, dest, *, message: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not an option of this command: {self.message}")


def _refuse_seed(parser: argparse.ArgumentParser, message: str) -> None:
    parser.add_argument("--seed", action=_Renamed, message=message)


def add_train_seed_option(parser: argparse.ArgumentParser, default: int | None = 0, *, alias: bool = True,
                          help: str = "training seed of the vectors and φ") -> None:
    """``--train-seed`` (``args.train_seed``): the zoo's training seed of one run; with ``alias``
    ``--seed`` is the same option."""
    names = ("--train-seed", "--seed") if alias else ("--train-seed",)
    parser.add_argument(*names, dest="train_seed", type=seed, default=default, metavar="SEED", help=help)


def add_train_seeds_option(parser: argparse.ArgumentParser, help: str = "training seeds (default 0)") -> None:
    """``--seeds``: several training seeds, one run each (default ``[0]``)."""
    parser.add_argument("--seeds", type=seed, nargs="+", default=[0], metavar="SEED", help=help)


def add_probe_seed_option(parser: argparse.ArgumentParser) -> None:
    """``--probe-seed``: the seed of the Hutchinson, Hutch++ and Lanczos probes; ``--seed`` is refused."""
    parser.add_argument("--probe-seed", type=seed, default=CurvatureSettings.seed, metavar="SEED",
                        help="seed of the Hutchinson, Hutch++ and Lanczos probes")
    _refuse_seed(parser, "the probe seed is --probe-seed")


def add_bootstrap_seed_option(parser: argparse.ArgumentParser) -> None:
    """``--bootstrap-seed``: the seed of bootstrap resamples and permutations; ``--seed`` is refused."""
    parser.add_argument("--bootstrap-seed", type=seed, default=0, metavar="SEED",
                        help="seed of the bootstrap resamples and permutations")
    _refuse_seed(parser, "the bootstrap and permutation seed is --bootstrap-seed (the rows' training seed is "
                         "--train-seed)")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--bf16``, added to every subcommand (:func:`diag.cli.build_parser`).

    The CLI resolves ``--device`` once, before the command runs (:func:`train.devices.resolve_device`),
    so ``args.device`` is a ``torch.device`` in every command.
    """

    parser.add_argument("--device", default="auto", metavar="|".join(DEVICE_CHOICES),
                        help="where models and batches run (auto: CUDA, then MPS, then the CPU; named and "
                             "missing is an error)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast of fine-tuning and Kernel SHAP forwards (CUDA only; curvature stays fp32)")


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand accepts."""
    parser.add_argument("--store", type=Path, default=None, help="artifact store (default: $TVDIAG_STORE or ~/.cache/tvdiag)")
    parser.add_argument("--preset", default="default",
                        help="zoo and curvature settings: default | smoke (the micro backbone, a few images and steps "
                             "and a small curvature estimate: for trying things out and tests) | vitb-smoke (ViT-B/32 "
                             "at 224 px, a few images and steps) | dense (Kernel SHAP at ≈ 10 samples per patch) | "
                             "gradcam (Grad-CAM supervision)")
    parser.add_argument("--backbone", default=None,
                        help=f"a tvdiag config ({', '.join(local_configs())}) or an open_clip name such as ViT-B-32 "
                             f"(default: the preset's: {', '.join(f'{n} {c.backbone}' for n, c in PRESETS.items())})")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag already in its cache")
    parser.add_argument("--checkpoint", default=None, help="local weights file (safetensors or legacy .pt)")
    parser.add_argument("--data", action="append", default=[], metavar="[DOMAIN=]PATH",
                        help="local copy of a dataset (ImageFolder or torchvision-style root); repeatable")
    parser.add_argument("--rebuild", action="append", default=[], metavar="DOMAIN", type=domain_name,
                        help="rebuild DOMAIN's artifacts even if present or not written by tvdiag ('base': θ_base, "
                             "pretrained instead of copied from the repository; 'all': every one)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--workers", default=os.environ.get("TVDIAG_WORKERS", "auto"), metavar="auto|N",
                        help="local processes that build missing zoo domains and study pairs in parallel, sharing "
                             "this process's threads (auto: one per core, at most 4; 1 on a GPU; default "
                             "$TVDIAG_WORKERS or auto)")


def context_from(args: argparse.Namespace, default_domain: str | None = None) -> Context:
    """The :class:`Context` of a parsed command line (``--data`` entries without ``DOMAIN=`` go to ``default_domain``)."""
    data: dict[str, str] = {}
    for item in args.data:
        if "=" in item:
            name, path = item.split("=", 1)
        else:
            if default_domain is None:
                raise TvdiagError("--data needs DOMAIN=PATH here")
            name, path = default_domain, item
        data[check_name(name)] = path
    ctx = Context(store_root=args.store or default_root(), preset=args.preset, backbone=args.backbone,
                  pretrained=args.pretrained, checkpoint=args.checkpoint, data=data, progress=not args.quiet,
                  rebuild=tuple(args.rebuild), device=getattr(args, "device", None), bf16=getattr(args, "bf16", False),
                  workers=parse_workers(getattr(args, "workers", "1")))
    if is_distributed():  # torchrun: --rebuild spares whatever any rank of this run wrote
        ctx.started = shared_start_time(ctx.started)
    return ctx
