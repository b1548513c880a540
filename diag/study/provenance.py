"""Where a study table's numbers came from: the code, the settings and the vectors of every run.

Beside each table ``<table>`` the study writes ``<table>.provenance.json``: per run (α, training
seed, variant) the commit of the code that scored it (``git rev-parse HEAD`` of the checkout,
with ``dirty`` when it had uncommitted changes; ``unknown`` outside a git checkout), the
study's settings, the torch thread count of the scoring process, and per domain the content
key, tensor checksum, thread count and tvdiag version recorded in each vector and φ file it
used — what a reader needs to rebuild the table and compare (``scripts/reproduce_seed0.sh``).
Wall-clock values never enter it, so the same inputs give the same bytes.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from diag import __version__
from train.tensorio import CHECKSUM_KEY, merge_json_side, read_metadata

_REPO = Path(__file__).resolve().parents[2]
SUFFIX = ".provenance.json"


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """``{"tvdiag_version", "commit", "dirty"}`` of the code running now (commit ``unknown`` outside git)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"tvdiag_version": __version__, "commit": commit or "unknown", "dirty": bool(status)}


def _file_facts(path: Path) -> dict:
    meta = read_metadata(path)
    return {k: meta.get(k) for k in ("key", CHECKSUM_KEY, "torch_threads", "tvdiag_version")}


def run_provenance(ws, settings, domains) -> dict:
    """The provenance of one run of a study (see the module docstring)."""
    files = {d: {"ft": _file_facts(ws.vector_path(d, "ft")), "ftx": _file_facts(ws.vector_path(d, "ftx")),
                 "phi": _file_facts(ws.attribution_path(d))} for d in domains}
    for d in domains:  # the twin, τ*'s reference of from-ft (paper and from-ft-raw: θ_ft, already there)
        if ws.vector_path(d, "ref") != ws.vector_path(d, "ft"):
            files[d]["ref"] = _file_facts(ws.vector_path(d, "ref"))
    return {"code": code_version(), "settings": json.loads(json.dumps(asdict(settings), default=str)),
            "torch_threads": torch.get_num_threads(), "base_hash": ws.base_hash, "domains": files}


def record(table: Path, run: str, payload: dict) -> None:
    """Add (or replace) ``run``'s entry of ``table``'s provenance side file (atomically)."""
    merge_json_side(Path(table).with_name(Path(table).name + SUFFIX), {run: payload})
