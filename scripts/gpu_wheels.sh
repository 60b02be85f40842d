#!/usr/bin/env bash
# Download (here, with network) the wheels scripts/gpu_check.sh installs on a GPU machine without network:
# diffusers and its dependencies for CPython 3.12 on x86-64 Linux, into gpu-wheels/ (git-ignored; carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip download -q --dest gpu-wheels --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    diffusers safetensors
du -sh gpu-wheels
