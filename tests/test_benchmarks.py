"""benchmarks/: the environment line every benchmark prints beside its figures."""
import os
import re

import torch

from benchmarks import environment


def test_header_names_machine_torch_commit_and_load():
    line = environment.header("cpu")
    assert f"{os.cpu_count()} logical CPUs" in line and "device: cpu" in line and "torch " in line
    assert re.search(r"commit ([0-9a-f]{7,}\+?|unknown)", line)
    assert re.search(r"before: load average [\d.]+ [\d.]+ [\d.]+$", line)
    assert environment.footer().startswith("after: load average ")


def test_step_profile_times_every_phase_of_a_real_step(tmp_path):
    from argparse import Namespace

    from benchmarks import step_profile
    from datasets.synthetic import make_synthetic_coco

    info = make_synthetic_coco(str(tmp_path), num_train=4, num_val=1, image_size=64, seed=0)
    opts = Namespace(device="cpu", batch_size=2, num_workers=0)
    model_flags, data = step_profile.CONFIGS["tiny-demo"]
    batches, waits = step_profile.loaded_batches(model_flags, data, opts, str(tmp_path), info["num_classes"], 3)
    assert len(batches) == len(waits) == 3  # more than the loader's 2 batches: it starts over
    assert [len(targets) for _, targets in batches] == [2, 2, 2]
    for loss, flags in step_profile.LOSSES.items():
        setting = step_profile.Setting(model_flags, data, flags, opts, info["num_classes"])
        before = [p.detach().clone() for p in setting.model.parameters()]
        seconds = setting.step(batches[0])
        assert tuple(seconds) == step_profile.PHASES
        assert seconds["matching"] > 0 and all(v >= 0 for v in seconds.values()), (loss, seconds)
        # a real step: the optimizer moved the weights (DAP alone has no gradient from an untrained
        # model whose boxes miss every object: L̂(0) = 0 and nothing is a true positive)
        moved = any(not torch.equal(a, b) for a, b in zip(before, setting.model.parameters()))
        assert moved or loss == "dap"


def test_paired_ratios_are_taken_round_by_round():
    # the machine slows down 3x in the last two rounds: medians of separate settings would give
    # 2.0 / 1.0 = 2 for "b", the per-round ratio is 1.5 in every round
    times = {"raw": [1.0, 1.0, 1.0, 3.0, 3.0], "b": [1.5, 1.5, 1.5, 4.5, 4.5],
             "c": [1.0, 2.0, 3.0, 12.0, 15.0]}
    ratios = environment.paired_ratios(times, "raw")
    assert ratios["raw"] == (1.0, 1.0, 1.0)
    assert ratios["b"] == (1.5, 1.5, 1.5)
    assert ratios["c"] == (3.0, 2.0, 4.0)  # ratios 1, 2, 3, 4, 5
    assert environment.paired_ratios({"raw": [2.0], "b": [3.0]}, "raw")["b"] == (1.5, 1.5, 1.5)


def test_round_robin_interleaves_the_settings_and_drops_the_warm_up_round():
    calls = []

    def measure(setting):
        calls.append(setting)
        return float(len(calls))

    times = environment.round_robin({"a": "A", "b": "B"}, measure, repeats=2)
    assert calls == ["A", "B"] * 3
    assert times == {"a": [3.0, 5.0], "b": [4.0, 6.0]}  # round 0 (calls 1 and 2) left out
