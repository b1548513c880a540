"""``diag verify``: check every tensor file and study table of a store against its checksums."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from diag.commands.output import emit_json
from diag.table import read_table
from train.errors import ArtifactError, StoreError
from train.tensorio import check_tensor_files, FileCheck
from train.store import default_root


def register(sub) -> None:
    v = sub.add_parser("verify", help="check every tensor file and study table of a store against the checksums "
                                      "recorded when they were written (exit 1 if any is damaged)")
    v.add_argument("--store", type=Path, default=None,
                   help="store root, or any folder of tvdiag files (default: $TVDIAG_STORE or ~/.cache/tvdiag)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=run_verify)


def study_tables(root: Path) -> list[Path]:
    """Every study table (``pairs.csv`` and its shards) under ``root``."""
    return sorted(p for p in root.rglob("pairs*.csv") if p.is_file() and not p.name.startswith("."))


def check_table(path: Path) -> FileCheck:
    """A study table's verdict: ``ok`` when it reads as trusted (its check file agrees), else ``damaged``."""
    try:
        read_table(path)
    except ArtifactError as err:
        return FileCheck(path, "damaged", str(err))
    return FileCheck(path, "ok")


def run_verify(args) -> int:
    """``diag verify``: one line per damaged or unchecked file, then a count; exit 1 when any is damaged."""
    root = Path(args.store or default_root()).expanduser()
    if not root.is_dir():
        raise StoreError(f"no store at {root}: --store names the folder to check")
    bar = (lambda files: tqdm(files, desc="verify tensors", unit="file", disable=args.quiet or args.json))
    checks = check_tensor_files(root, progress=bar) + [check_table(p) for p in study_tables(root)]
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "unchecked", "damaged")}
    if args.json:
        emit_json({"store": str(root), "counts": counts, "files": [c.to_dict() for c in checks if c.status != "ok"]})
    else:
        for c in checks:
            if c.status != "ok":
                print(f"{c.status:9s} {c.path}: {c.detail}")
        print(f"{root}: {len(checks)} files checked: {counts['ok']} ok, {counts['unchecked']} without a checksum, "
              f"{counts['damaged']} damaged" + (" (pass --rebuild DOMAIN to the command that built a damaged file)"
                                                  if counts["damaged"] else ""))
    return 1 if counts["damaged"] else 0
