"""benchmarks/: the environment line every benchmark prints beside its figures."""
import os
import re

from benchmarks import environment


def test_header_names_machine_torch_commit_and_load():
    line = environment.header("cpu")
    assert f"{os.cpu_count()} logical CPUs" in line and "device: cpu" in line and "torch " in line
    assert re.search(r"commit ([0-9a-f]{7,}\+?|unknown)", line)
    assert re.search(r"before: load average [\d.]+ [\d.]+ [\d.]+$", line)
    assert environment.footer().startswith("after: load average ")
