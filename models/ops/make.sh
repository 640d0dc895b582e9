#!/usr/bin/env bash
# Build the MultiScaleDeformableAttention CUDA op for the active Python environment.
#   bash models/ops/make.sh            # pip install into the environment
#   bash models/ops/make.sh --inplace  # build the .so next to this script instead
# Without a visible GPU, prefix with FORCE_CUDA=1. Override CUDA_HOME, TORCH_CUDA_ARCH_LIST and
# PYTHON as needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;9.0+PTX}"
PYTHON="${PYTHON:-python}"
if [ "${1:-}" = "--inplace" ]; then
  "$PYTHON" setup.py build_ext --inplace
else
  # --no-build-isolation: the build must see the installed torch
  "$PYTHON" -m pip install --no-build-isolation .
fi
