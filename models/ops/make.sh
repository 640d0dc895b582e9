#!/usr/bin/env bash
# Build the MultiScaleDeformableAttention CUDA op for the active Python environment.
#   bash models/ops/make.sh            # pip install into the environment
#   bash models/ops/make.sh --inplace  # build the .so next to this script instead
# Without a visible GPU, prefix with FORCE_CUDA=1. Override CUDA_HOME, TORCH_CUDA_ARCH_LIST and
# PYTHON as needed.
#
# Architectures, unless TORCH_CUDA_ARCH_LIST says: those of the visible GPUs (torch detects
# them); without a GPU, every architecture the installed torch was built for, with PTX for newer
# ones. A build without code for a GPU is not used there: models/ops says so and falls back to the
# PyTorch path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" - <<'PY'
import re
import torch
archs = sorted({int(m.group(1)) for a in torch.cuda.get_arch_list() if (m := re.fullmatch(r"sm_(\d+)[a-z]?", a))})
print(";".join(f"{a // 10}.{a % 10}" for a in archs) + "+PTX" if archs else "8.0;8.6;9.0+PTX")
PY
)"
  export TORCH_CUDA_ARCH_LIST
fi
echo "building for: ${TORCH_CUDA_ARCH_LIST:-the visible GPUs}"
if [ "${1:-}" = "--inplace" ]; then
  "$PYTHON" setup.py build_ext --inplace
else
  # --no-build-isolation: the build must see the installed torch
  "$PYTHON" -m pip install --no-build-isolation .
fi
