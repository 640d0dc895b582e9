"""What a benchmark prints beside its figures, so that a reader can tell where and under what load
they were taken: the machine (CPU model, logical CPUs, the device), torch, the commit, and the load
average before and after the measurement."""
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit():
    """The checked-out commit, '+' when the work tree has changes; 'unknown' outside git."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average():
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def header(device):
    """One line: machine, device, torch, threads, commit, load average now."""
    device = torch.device(device)
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; device: {on}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; commit {commit()}; before: {load_average()}")


def footer():
    return f"after: {load_average()}"
