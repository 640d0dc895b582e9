#!/usr/bin/env bash
# Set up (or reuse) the virtual environment, lint the code (ruff, configured in pyproject.toml)
# and run the whole test suite on the CPU.
#   bash scripts/run_tests.sh [extra pytest args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$here/scripts/setup_env.sh")"
cd "$here"
# One thread per process: the suite runs on small CPU machines where threads only contend.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -q "$@" tests
