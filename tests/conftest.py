"""Shared test helpers: one thread per test process, a small synthetic COCO-format dataset
generated once per session, the tiny model flags of each family that the CPU tests use, and
parsing / running main.py as its users do (a child parser of get_args_parser)."""
import argparse
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import main as detr_main
from datasets import category_ids
from models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(1)

# A DETR small enough to train for a few iterations in seconds on one CPU core.
TINY_DETR_FLAGS = [
    "--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone",
    "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2",
    "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "10",
    "--input_scale", "0.12", "--num_workers", "0", "--print_freq", "5",
]

# Deformable DETR: resnet18, hidden 32, 1 encoder / 2 decoder layers, 10 queries, 5 classes, 2 points.
TINY_DEFORMABLE_FLAGS = TINY_DETR_FLAGS + ["--model", "deformable_detr", "--num_classes", "5",
                                           "--enc_n_points", "2", "--dec_n_points", "2"]
DEFORMABLE_VARIANTS = {
    "single_scale": ["--num_feature_levels", "1"],
    "multi_scale": [],
    "box_refine": ["--with_box_refine"],
    "two_stage": ["--with_box_refine", "--two_stage"],
}

TINY_RTDETR_FLAGS = [
    "--model", "rtdetr", "--device", "cpu", "--backbone", "presnet18vd", "--no_pretrained_backbone",
    "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1",
    "--dec_layers", "2", "--num_queries", "16", "--num_denoising", "8", "--input_scale", "0.1",
    "--num_workers", "0", "--print_freq", "5", "--batch_size", "2",
]


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """A tiny synthetic dataset in the exact COCO layout; returns (path, num_classes)."""
    from datasets.synthetic import make_synthetic_coco
    root = tmp_path_factory.mktemp("synthetic_coco")
    info = make_synthetic_coco(str(root), num_train=8, num_val=4, image_size=96, seed=0)
    return str(root), info["num_classes"]


def parse(flags):
    """main.py's arguments, parsed as a user's script would: a child parser of get_args_parser."""
    return argparse.ArgumentParser(parents=[detr_main.get_args_parser()]).parse_args(flags)


def run(flags):
    """main.main on these flags (the output folder created as the command line does)."""
    args = parse(flags)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    return detr_main.main(args)


def data_flags(synthetic_coco):
    """The tiny DETR on the synthetic dataset, 2 images per batch."""
    path, num_classes = synthetic_coco
    return TINY_DETR_FLAGS + ["--coco_path", path, "--num_classes", str(num_classes), "--batch_size", "2"]


def rtdetr_args(*flags):
    return parse(TINY_RTDETR_FLAGS + list(flags))


def build_rtdetr(*flags):
    """The tiny RT-DETR (seed 0), classifying the dataset's categories when --coco_path is given."""
    torch.manual_seed(0)
    args = rtdetr_args(*flags)
    return build_model(args, category_ids(args))


def rtdetr_targets():
    return [{"labels": torch.tensor([3, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])},
            {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])}]


def reference_giou(a, b):
    """Generalized IoU of two xyxy boxes given as sequences of floats, written out (the tests'
    reference for util.box_ops)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def assert_equal_states(a, b, where="checkpoint"):
    """Two nests of dicts, lists and tuples hold the same keys and values, every tensor equal to
    the bit (torch.equal)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_states(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces, backward included."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out
