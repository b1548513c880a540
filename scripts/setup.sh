#!/usr/bin/env bash
# Create .venv (if missing) and install tvdiag into it. Idempotent.
#   bash scripts/setup.sh         what a user needs (the `diag` command and its backends)
#   bash scripts/setup.sh --dev   plus the test extras (pytest, hypothesis, ruff, captum, notebooks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=""
if [ "${1:-}" = "--dev" ]; then EXTRAS="[test]"; fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch/torchvision first: pinned releases (see pyproject); pip takes them from the local wheel cache when present.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS}"
.venv/bin/python -c "import torch, open_clip, train, diag; print('tvdiag ready: torch', torch.__version__)"
