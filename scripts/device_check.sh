#!/usr/bin/env bash
# One JSON line measuring the real-size path on a GPU (ViT-B-32 random weights, 224 px, M = 49):
# fine-tuning images/s, Kernel SHAP images/s at 500 samples against raw forward images/s,
# HVP/gradient time ratio on the full vision tower, peak memory. Budget: < 8 min on one GPU.
# Without a GPU it prints one JSON line saying so and exits 0.
#   bash scripts/device_check.sh              (extra flags go to python -m diag.bench.device_check:
#   bash scripts/device_check.sh --bf16        --device cuda:N, --bf16, --cpu-smoke)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" -W ignore -m diag.bench.device_check "$@"
