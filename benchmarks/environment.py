"""What a benchmark prints beside its figures, so that a reader can tell where and under what load
they were taken: the machine (CPU model, logical CPUs, the device), torch, the commit, the memory
allocator's setting, and the load average before and after the measurement."""
import ctypes
import ctypes.util
import os
import platform
import statistics
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator = "system default"


def keep_freed_memory():
    """Make glibc keep freed memory for reuse, as CUDA's caching allocator does on a GPU.

    By default glibc hands large freed blocks back to the kernel and faults them in again on
    the next allocation. Which blocks, and so the cost, depends on how the heap happens to be
    laid out: measured on the 2-core CPU, the same criterion step took 300 or 400 ms from one
    process to the next, in system time alone (page faults), which swamps the differences the
    benchmarks measure. Blocks up to 32 MiB (glibc's largest mmap threshold) now come from the
    heap, which is never trimmed. A no-op outside glibc; header() says which applies.
    """
    global _allocator
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not (mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        _allocator = "system default (mallopt unavailable)"
        return
    _allocator = "glibc keeps freed memory (benchmarks.environment.keep_freed_memory)"


def load_average():
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def header(device):
    """One line: machine, device, torch, threads, commit, load average now."""
    device = torch.device(device)
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return (f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; device: {on}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; commit {commit()}; allocator: {_allocator}; "
            f"before: {load_average()}")


def footer():
    return f"after: {load_average()}"


def round_robin(settings, measure, repeats):
    """{name: [seconds per round]}: measure(setting) for every setting in turn, repeats + 1
    rounds, the first a warm-up left out. Interleaving the settings makes a drift in the
    machine's load hit all of them alike (and paired_ratios can then cancel it)."""
    times = {name: [] for name in settings}
    for round_ in range(repeats + 1):
        for name, setting in settings.items():
            seconds = measure(setting)
            if round_:
                times[name].append(seconds)
    return times


def paired_ratios(times, reference):
    """times: {setting: [seconds per round]} from settings timed round-robin. Each round's time
    over the reference setting's in the same round, summarised as (median, lower quartile,
    upper quartile) per setting: the settings of one round ran on about the same machine state,
    so the ratio of a round cancels the slow drifts that move the medians of separate runs."""
    out = {}
    for name, seconds in times.items():
        ratios = [t / r for t, r in zip(seconds, times[reference], strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[name] = (median, q1, q3)
    return out
