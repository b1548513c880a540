#!/usr/bin/env bash
# Run the README's worked example as written, with random weights and a few images, in a temp folder.
#   bash scripts/worked_example.sh [WORKDIR]
# Writes base.safetensors (a random open_clip ViT-B/32), two sources fine-tuned from it (θ_ft and
# θ_ft* of dtd; θ_ft and a bare τ* of resisc45), a target model eurosat_ft.safetensors and an
# ImageFolder EuroSAT/ (10 classes × 2 images), then runs the README's ```bash block in WORKDIR
# with `diag` = this checkout's CLI and a small card (CARD, overridable).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CARD=${CARD:-"--n-images 2 --batch-size 2 --probes 2"}
cd "$WORK"

"$PY" - <<'EOF'
"""The user's files: random weights with small seeded fine-tuning steps, noise images."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from train.backbones import create_backbone
from train.datasets.templates import EUROSAT_FOLDERS

base = create_backbone("ViT-B-32", seed=0).clip.state_dict()


def moved(seed: int, scale: float = 0.01) -> dict:
    """θ_base + a seeded perturbation of the vision tower of ~1 % per tensor: 'fine-tuned elsewhere'."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + scale * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=gen)
                if k.startswith("visual.") and v.is_floating_point() and v.numel() > 1 else v).contiguous()
            for k, v in base.items()}


save_file({k: v.contiguous() for k, v in base.items()}, "base.safetensors")
for seed, name in enumerate(("dtd_ft", "dtd_ftx", "resisc45_ft", "eurosat_ft"), start=1):
    save_file(moved(seed), f"{name}.safetensors")
gen = torch.Generator().manual_seed(9)
save_file({k: 0.001 * torch.randn(v.shape, generator=gen) for k, v in base.items() if k.startswith("visual.")},
          "resisc45_star.safetensors")
rng = np.random.default_rng(0)
for cls in EUROSAT_FOLDERS:  # the real copy's folder names
    folder = Path("EuroSAT") / cls
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
EOF

diag() { "$PY" -m diag.cli "$@"; }
# the README's block between the worked-example marker and the end of its ```bash fence
BLOCK=$(sed -n '/<!-- worked-example:/,/^```$/p' "$REPO/README.md" | sed '1,2d;$d')
eval "$BLOCK"
echo "worked example done in $WORK"
