"""Helpers of the adversarial suite (the refusal contract, tree hashes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diag.cli import main


def tree_hash(root: Path) -> str:
    """sha256 over every folder name and every file's name and bytes under ``root``."""
    digest = hashlib.sha256()
    root = Path(root)
    if not root.exists():
        return "absent"
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            digest.update(f"D {rel}\n".encode())
        else:
            digest.update(f"F {rel} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def common(root: Path) -> list[str]:
    return ["--store", str(root), "--preset", "smoke", "--quiet", "--json"]


def refused(capsys, argv: list[str], needle: str, *roots: Path) -> str:
    """Run ``argv``; assert the refusal contract; returns the stderr line."""
    before = [tree_hash(r) for r in roots]
    code, out, err = run(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert out == ""
    assert [tree_hash(r) for r in roots] == before
    return lines[0]
