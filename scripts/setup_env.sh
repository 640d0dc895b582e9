#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and print its path.
# The venv lives outside the clone, keyed by a hash of the requirement files, so CI runs
# and fresh clones reuse it. Override the location with DAP_DETR_VENV.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key=$(cat "$here/requirements.txt" "$here/requirements-test.txt" "$here/scripts/setup_env.sh" | sha256sum | cut -c1-12)
venv="${DAP_DETR_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dap-detr/venv-$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "[setup_env] creating $venv (first time: about a minute)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2 || true
  # torch/torchvision pinned to the tested pair so pip never resolves to an unexpected build.
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==${DAP_DETR_TORCH:-2.14.1}" "torchvision==${DAP_DETR_TORCHVISION:-0.29.1}" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-test.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv"
