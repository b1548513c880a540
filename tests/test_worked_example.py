"""The README's worked example runs as written (scripts/worked_example.sh: random ViT-B/32 weights, 20 images)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_worked_example_runs(tmp_path):
    try:
        _run_and_check(tmp_path)
    finally:  # ~8 GB of weights, vectors and card: not left for pytest's kept temp folders
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_and_check(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "worked_example.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count(" imported: ") == 5  # θ_base, then θ_ft and θ_ft* (or τ*) of two sources
    store = tmp_path / "tvdiag-store" / "ViT-B-32-ckpt-base"
    assert {p.name for p in (store / "vectors").iterdir()} == {"dtd", "resisc45"}
    from diag.curvature.card import HessianCard

    card = HessianCard.load(tmp_path / "card.safetensors")
    assert card.k == 1 and card.dim == 87_849_216 and card.provenance["n_images_used"] == "2"
    # the ranked, explained recommendation: a tier-1 table of both sources and the notes saying why
    assert "tier 1" in out
    ranked = [line.split()[1] for line in out.splitlines() if line.strip()[:1].isdigit() and "  " in line]
    assert sorted(ranked) == ["dtd", "resisc45"]
    assert "ranked by cos(τ_ft) alone" in out and "λ2 capped by the card" in out
