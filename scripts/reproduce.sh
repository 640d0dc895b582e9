#!/usr/bin/env bash
# One experiment of configs/ with one command (details: scripts/reproduce.py --help).
#   scripts/reproduce.sh CONFIG [--gpus K] [--nodes M] [--slurm] [--coco_path P] [--set KEY=VALUE] [-- flags]
# Runs with $PYTHON, else the python3 on PATH (the environment that has torch, e.g. on a cluster).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/reproduce.py" "$@"
