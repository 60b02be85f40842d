#!/usr/bin/env bash
# GPU check in one line from the repo root of a bare GPU machine (Python 3.12 with torch, no network):
#   bash scripts/gpu_check.sh            (add --device cpu --tiny for the dry run)
# diffusers and what it needs come from gpu-wheels/ (made here by scripts/gpu_wheels.sh) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import diffusers, safetensors" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links gpu-wheels diffusers safetensors
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" benchmarks/gpu_check.py "$@"
