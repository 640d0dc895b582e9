import json

import pytest
import torch

from util import plot_utils
from util.logs import COCO_STATS
from util.plot_utils import plot_logs, plot_precision_recall, plot_precision_tables, precision_recall, read_log

from conftest import data_flags, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_eval(path, per_class_precision):
    """A COCOeval-shaped precision array [T=10, R=101, K, A=4, M=3] with the given curve for
    every IoU threshold and area, -1 for classes without ground truth."""
    precision = torch.full((10, 101, len(per_class_precision), 4, 3), -1.0)
    for k, value in enumerate(per_class_precision):
        if value is not None:
            precision[:, :, k] = value
    torch.save({"precision": precision, "recall": torch.zeros(10, len(per_class_precision), 4, 3),
                "scores": torch.zeros_like(precision)}, path)


def test_precision_recall_averages_classes_with_ground_truth(tmp_path):
    path = tmp_path / "eval.pth"
    write_eval(path, [0.2, None, 0.6])
    recall, precision = precision_recall(path, 0.75)
    assert recall[0] == 0 and recall[-1] == 1 and len(recall) == 101
    assert torch.allclose(precision, torch.full((101,), 0.4))


def test_plots_are_written_as_png(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    with open(run / "log.txt", "w") as f:
        for epoch in range(3):
            f.write(json.dumps({"epoch": epoch, "train_loss": 3.0 - epoch, "test_loss": 3.5 - epoch,
                                "test_coco_eval_bbox": [0.1 * epoch] + [0.0] * 11}) + "\n")
    write_eval(run / "eval" / "latest.pth", [0.5])
    plot_logs([run], out_path=tmp_path / "logs.png")
    plot_precision_recall([run / "eval" / "latest.pth"], out_path=tmp_path / "pr.png")
    for name in ("logs.png", "pr.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def two_runs(synthetic_coco, tmp_path_factory):
    """One epoch of the tiny DETR with the upstream losses, and one with DAP and the momentum matcher."""
    root = tmp_path_factory.mktemp("compare")
    flags = data_flags(synthetic_coco) + ["--epochs", "1", "--no_tensorboard"]
    run(flags + ["--output_dir", str(root / "raw")])
    run(flags + ["--output_dir", str(root / "dap"), "--loss", "raw+dap", "--matcher", "dap", "--dap_cost_mode",
                 "momentum"])
    return root / "raw", root / "dap"


def test_compare_writes_a_png_and_the_coco_numbers_with_differences(two_runs, tmp_path, capsys):
    out = tmp_path / "compare.png"
    plot_utils.main([*map(str, two_runs), "--out", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| metric | raw | dap |" and lines[1] == "| --- | --- | --- |"
    raw, dap = (read_log(run_dir / "log.txt")[-1]["test_coco_eval_bbox"] for run_dir in two_runs)
    for i, metric in enumerate(COCO_STATS):
        assert lines[2 + i] == (f"| {metric} | {100 * raw[i]:.1f} | {100 * dap[i]:.1f} "
                                f"({100 * (dap[i] - raw[i]):+.1f}) |")


def test_compare_refuses_a_folder_without_a_run_in_one_line(two_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_utils.main([str(two_runs[0]), str(tmp_path), "--out", str(tmp_path / "compare.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} holds no COCO numbers (no eval_stats.json, no evaluated "
                                       "epoch in log.txt): pass the --output_dir of a run that finished an epoch, "
                                       "or of main.py --eval\n")
    assert not (tmp_path / "compare.png").exists()


def test_precision_tables_are_drawn_as_heat_maps(two_runs, tmp_path):
    figures = plot_precision_tables(two_runs[1], out_path=tmp_path / "dap.png")
    assert sorted(figures) == ["train_dap_precision_table", "train_matcher_precision_table"]
    for name in figures:
        assert (tmp_path / f"dap_{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_precision_tables(two_runs[0]) == {}  # the upstream losses have no table
