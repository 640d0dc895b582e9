"""Speed and memory measurements; run them from the repository root as modules (python -m benchmarks.NAME)."""
