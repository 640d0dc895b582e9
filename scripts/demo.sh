#!/usr/bin/env bash
# The README's main command: set up the environment and run the CPU demo
# (synthetic data, a tiny DETR trained briefly, fine-tuned with each loss, COCO AP printed).
#   bash scripts/demo.sh [scripts/demo.py options]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$here/scripts/setup_env.sh")"
cd "$here"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$venv/bin/python" scripts/demo.py "$@"
