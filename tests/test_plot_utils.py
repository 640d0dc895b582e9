import json

import torch

from util.plot_utils import plot_logs, plot_precision_recall, precision_recall

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
