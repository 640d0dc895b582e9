#!/usr/bin/env bash
# The README's main command: set up the environment and run the CPU mini-study's quick variant
# (synthetic data, a tiny DETR pretrained briefly, fine-tuned with each loss: COCO AP table and
# plots in outputs/mini_study_quick/).
#   bash scripts/demo.sh [python -m scripts.mini_study options]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$here/scripts/setup_env.sh")"
cd "$here"
exec "$venv/bin/python" -m scripts.mini_study --quick "$@"
