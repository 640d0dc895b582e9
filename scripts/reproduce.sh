#!/usr/bin/env bash
# One experiment of configs/ with one command (details: scripts/reproduce.sh --help).
#   scripts/reproduce.sh CONFIG [--gpus K] [--nodes M] [--slurm] [--coco_path P] [--set KEY=VALUE] [-- flags]
# Runs with $PYTHON, else the python3 on PATH (the environment that has torch, e.g. on a cluster).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The project is imported from the repository (not installed); the working directory stays the caller's.
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m scripts.reproduce "$@"
