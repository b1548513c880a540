#!/usr/bin/env bash
# Create .venv (if missing) and install tvdiag with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch/torchvision first: pinned releases (see pyproject); pip takes them from the local wheel cache when present.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import torch, open_clip, train, diag; print('tvdiag ready: torch', torch.__version__)"
