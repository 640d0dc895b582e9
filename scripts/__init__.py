"""Command-line tools around main.py; run them from the repository root as modules (python -m scripts.NAME)."""
