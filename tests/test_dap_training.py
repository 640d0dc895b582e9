"""DAP-loss end to end: main.py trains a tiny DETR with --loss dap (and the AP-cost matcher) or
--loss raw+dap on a handful of images, and DAP improves while COCO evaluation runs each epoch.

The images hold one large box each, near the centre. A freshly initialised DETR predicts boxes
of about half the image around the centre, so its matched boxes already reach IoU 0.5: without
that, every positive is a false positive at all ten IoU thresholds, precision is 0, and DAP and
its gradient are exactly 0 (DAP-loss alone cannot start from nothing)."""
import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

import main as detr_main

from conftest import TINY_DETR_FLAGS


def make_big_box_coco(root, num_train=2, num_val=2, size=64, seed=0):
    """COCO layout, category 1 only: a bright rectangle of 50-65 % of the side on a dark noisy image."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        os.makedirs(os.path.join(root, f"{split}2017"))
        images, annotations = [], []
        for i in range(count):
            pixels = rng.uniform(0, 60, (size, size, 3))
            w, h = (rng.uniform(0.5, 0.65, 2) * size).round().astype(int)
            x, y = (size - w) // 2 + rng.integers(-3, 4), (size - h) // 2 + rng.integers(-3, 4)
            pixels[y:y + h, x:x + w] = rng.uniform(150, 255, 3)
            name = f"{i + 1:012d}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, f"{split}2017", name))
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                "bbox": [int(x), int(y), int(w), int(h)], "area": int(w * h)})
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "box", "supercategory": "shape"}]}, f)


@pytest.fixture(scope="module")
def big_box_coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("big_box_coco"))
    make_big_box_coco(root)
    return root


@pytest.mark.parametrize("flags", [["--loss", "dap", "--matcher", "dap"], ["--loss", "raw+dap"]],
                         ids=["dap", "raw+dap"])
def test_training_improves_dap(big_box_coco, tmp_path, flags):
    out = str(tmp_path)
    argv = TINY_DETR_FLAGS + ["--coco_path", big_box_coco, "--num_classes", "2", "--batch_size", "2",
                              "--no_train_augmentation", "--dropout", "0", "--lr", "1e-3", "--epochs", "8",
                              "--dap_num_gt", "0", "--output_dir", out, *flags]
    detr_main.main(argparse.ArgumentParser(parents=[detr_main.get_args_parser()]).parse_args(argv))

    with open(os.path.join(out, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    assert [row["epoch"] for row in log] == list(range(8))
    # One batch per epoch: each row is one step's loss, the first before any update.
    first, last = log[0]["train_loss_dap"], log[-1]["train_loss_dap"]
    assert first < 0 and last < 1.5 * first, [row["train_loss_dap"] for row in log]
    for row in log:
        assert row["train_loss_dap"] == pytest.approx(-row["train_dap_value"])  # --dap_loss_coef 1
        assert len(row["test_coco_eval_bbox"]) == 12
        assert all(-1 <= v <= 1 for v in row["test_coco_eval_bbox"])
    if "raw+dap" in flags:
        assert log[-1]["train_loss_ce"] < log[0]["train_loss_ce"]
