"""Shared fixtures: one thread per test process, the repo on sys.path, a small synthetic
COCO-format dataset generated once per session, and the tiny model flags the CPU tests use."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

torch.set_num_threads(1)

# A DETR small enough to train for a few iterations in seconds on one CPU core.
TINY_DETR_FLAGS = [
    "--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone",
    "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2",
    "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "10",
    "--input_scale", "0.12", "--num_workers", "0", "--print_freq", "5",
]


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A tiny synthetic dataset in the exact COCO layout; returns (path, num_classes)."""
    from datasets.synthetic import make_synthetic_coco
    root = tmp_path_factory.mktemp("synthetic_coco")
    info = make_synthetic_coco(str(root), num_train=8, num_val=4, image_size=96, seed=0)
    return str(root), info["num_classes"]
