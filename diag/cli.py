"""The ``diag`` command line: ``main(argv)`` dispatches to the subcommands in :mod:`diag.commands`.

Human tables by default, ``--json`` for machines, progress bars on long work. Bad input
(unknown names, corrupt or unsafe files, out-of-range values, an unwritable store) gives
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from train.errors import TvdiagError

COMMAND_MODULES = ("transfer", "curvature", "studies", "decide")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diag", description="Hessian and task-vector diagnostics of explainability transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"diag.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"diag.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


class _ArgumentError(Exception):
    pass


def _maybe_init_distributed() -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU).

    Curvature products are then averaged over the ranks' data shards and probes split
    across ranks; only rank 0 prints. Returns this process's rank.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a 'no-go' verdict, 2 bad input)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if _maybe_init_distributed() != 0:
        import io
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):
            return _run(argv)
    return _run(argv)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except TvdiagError as err:
        print(f"diag {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed artifacts are kept and the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
