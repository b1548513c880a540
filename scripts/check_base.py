"""Rebuild the shipped θ_base from scratch and check it is byte for byte the one in ``data/base/``.

    .venv/bin/python scripts/check_base.py [--name tiny-s0] [--store DIR] [--keep]

Pretrains θ_base in an empty store exactly as ``diag zoo --rebuild base`` does (the same code
path: :meth:`train.zoo.build.Zoo.base` with ``rebuild={"base"}``), at the thread count recorded
in the manifest, and compares the sha256 of the weights (the file's data section) and the
weights' hash with the manifest's pins. Exit 0 when they match, 1 when they differ. About
5 minutes on one thread for ``tiny``; not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from train.store import Store
from train.tensorio import data_sha256, read_metadata
from train.zoo import Zoo
from train.zoo.config import preset
from train.zoo.shipped import MANIFEST, read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="tiny-s0", help="the manifest entry to rebuild")
    parser.add_argument("--store", type=Path, default=None, help="where to rebuild (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt store")
    args = parser.parse_args(argv)

    entry = read_manifest().get(args.name)
    if entry is None:
        print(f"no entry {args.name!r} in {MANIFEST}", file=sys.stderr)
        return 2
    torch.set_num_threads(int(entry["torch_threads"]))
    root = args.store or Path(tempfile.mkdtemp(prefix="tvdiag-base-"))
    config = preset(entry["preset"])
    store = Store(root, config.backbone_id, rebuild=frozenset({"base"}), rebuild_before=time.time() + 1)
    start = time.perf_counter()
    _, base_hash = Zoo(store, config, progress=True).base()
    seconds = time.perf_counter() - start
    got = {"tensors_sha256": data_sha256(store.base_path()), "base_hash": base_hash,
           "key": read_metadata(store.base_path())["key"]}
    ok = all(got[k] == entry[k] for k in got)
    for k in got:
        print(f"{k:10s} shipped {entry[k]}  rebuilt {got[k]}  {'ok' if got[k] == entry[k] else 'DIFFERENT'}")
    print(f"rebuilt at {torch.get_num_threads()} thread(s) in {seconds:.0f} s: "
          f"{'byte for byte the shipped θ_base' if ok else 'NOT the shipped θ_base'}")
    if not args.keep and args.store is None:
        import shutil  # only here: the temporary store is removed after a check without --keep
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
