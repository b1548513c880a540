"""The ``diag`` command line: ``main(argv)`` dispatches to the subcommands in :mod:`diag.commands`.

Human tables by default, ``--json`` for machines (strict JSON, see :mod:`diag.commands.options`),
progress bars on long work. Bad input (unknown or unsafe names, corrupt or unsafe files,
out-of-range values, an unwritable store) gives exactly one line on stderr and exit code 2;
an unexpected exception gives a one-line summary and exit code 3 (the traceback with
``--debug``). Warnings raised during a failed run are dropped; after a successful run they
are printed after the output, one line each.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

from diag.commands.options import add_device_options
from diag.runtime.distributed import close_group, init_group, is_distributed, rank_and_world
from train.devices import check_bf16, hold_notices, resolve_device
from train.errors import TvdiagError

COMMAND_MODULES = ("transfer", "curvature", "studies", "decide", "openworld", "integrity")


class _ArgumentError(Exception):
    """argparse found a bad command line; the message is one line."""
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit code 2."""
    def error(self, message: str):
        raise _ArgumentError(self.prog, " ".join(message.split()))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diag", description="Hessian and task-vector diagnostics of explainability transfer")
    parser.add_argument("--debug", action="store_true", help="full traceback on unexpected errors (any position)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"diag.commands.{name}").register(sub)
    for command in sub.choices.values():
        add_device_options(command)
    return parser


def _maybe_init_distributed() -> bool:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU); whether it did.

    Curvature products are then averaged over the ranks' data shards and probes split
    across ranks; only rank 0 prints.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False

    if is_distributed():
        return False  # a caller's group: the caller leaves it
    init_group("env://")
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a 'no-go' verdict, 2 bad input, 3 an internal error).

    Under ``torchrun`` the group joined here is left here too (:func:`diag.runtime.distributed.close_group`):
    with a barrier when this rank's command succeeded (exit 0 or 1), at once when it failed.
    """
    logging.getLogger().setLevel(logging.WARNING)
    joined = _maybe_init_distributed()

    code = 3
    try:
        if rank_and_world()[0] != 0:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                code = _run(argv)
        else:
            code = _run(argv)
        return code
    finally:
        if joined:
            close_group(ok=code in (0, 1))


def _run(argv: list[str] | None) -> int:
    """Parse and run one command; every failure is one stderr line (traceback only with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TVDIAG_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), "")
    buffer = _LogBuffer()
    logging.getLogger().addHandler(buffer)
    with warnings.catch_warnings(record=True) as caught, hold_notices() as notices:
        warnings.simplefilter("default")
        # timm's import-time @torch.jit.script decorators (open_clip imports timm): nothing a user can act on
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            args.device = resolve_device(args.device)
            check_bf16(args.device, args.bf16)
            code = int(args.func(args) or 0)
        except SystemExit as exc:  # --help, or a command that exits itself
            return exc.code if isinstance(exc.code, int) else 0
        except _ArgumentError as err:
            return _fail(f"{err.prog}: error: {err}", 2)
        except TvdiagError as err:
            return _fail(f"diag {command}: error: {_one_line(err)}", 2)
        except KeyboardInterrupt:
            return _fail("interrupted; completed artifacts are kept and the next run resumes", 130)
        except Exception as err:  # a bug: still one line, the traceback behind --debug
            if debug:
                traceback.print_exc()
            return _fail(f"diag {command}: internal error: {type(err).__name__}: {_one_line(err)}"
                         + ("" if debug else " (rerun with --debug for the traceback)"), 3)
        finally:
            logging.getLogger().removeHandler(buffer)
    for line in [*notices, *(f"warning: {_one_line(w.message)}" for w in caught), *buffer.lines]:
        print(line, file=sys.stderr)  # success: warnings and log lines come after the output
    return code


class _LogBuffer(logging.Handler):
    """Holds WARNING+ log lines of a run: shown after a success, dropped with a one-line failure."""
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(_one_line(self.format(record)))


def _one_line(err) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 2000 else text[:1997] + "..."


def _fail(line: str, code: int) -> int:
    sys.stdout.flush()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
