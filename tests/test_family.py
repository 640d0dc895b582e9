"""models/family.py and each family's recipe: what DDP is told about parameters without a
gradient matches what a training step actually leaves without one, and a configuration that
has such parameters trains under DDP (one gloo process) past the iteration where DDP checks."""
import itertools
import os
import socket
import subprocess
import sys

import pytest
import torch

from models import FAMILIES, build_model

from conftest import REPO, TINY_DEFORMABLE_FLAGS, TINY_DETR_FLAGS, TINY_RTDETR_FLAGS, data_flags, parse, rtdetr_targets

CONFIGURATIONS = {
    "detr": (TINY_DETR_FLAGS, [[]]),
    "deformable_detr": (TINY_DEFORMABLE_FLAGS, [[], ["--with_box_refine"], ["--with_box_refine", "--two_stage"]]),
    "rtdetr": (TINY_RTDETR_FLAGS, [[], ["--num_denoising", "0"], ["--no_iou_aware_query_selection"]]),
}
LOSSES = ["raw", "dap", "ap", "alrp", "rs"]
CASES = [(model, variant, aux, loss)
         for model, (_, variants) in CONFIGURATIONS.items()
         for variant, aux, loss in itertools.product(variants, [[], ["--no_aux_loss"]], LOSSES)]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parameters_without_gradient(args):
    """The trainable parameters that one training step (forward, every loss, backward) leaves
    without a gradient."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    model.train()
    targets = rtdetr_targets()
    outputs = model(torch.rand(2, 3, 64, 64), targets)
    losses = criterion(outputs, targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("model, variant, aux, loss", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_find_unused_parameters_is_true_exactly_when_some_parameter_gets_no_gradient(model, variant, aux, loss):
    flags, _ = CONFIGURATIONS[model]
    if model == "rtdetr":  # COCO's categories; DAP or a ranking loss trains the query selection too
        extra = ["--no_iou_aware_query_selection"] if loss in ("dap", "ap", "alrp", "rs") else []
    else:
        extra = ["--num_classes", "5"]
    args = parse(flags + extra + ["--loss", loss, *variant, *aux])
    unused = parameters_without_gradient(args)
    assert FAMILIES[model].find_unused_parameters(args) == bool(unused), unused


def test_box_refinement_without_auxiliary_losses_trains_under_ddp(synthetic_coco, tmp_path):
    """Deformable DETR's per-layer heads of the earlier decoder layers get no gradient without
    the auxiliary losses; DDP stopped at the second iteration ("Expected to have finished
    reduction") until it was told to look for them. One gloo process, 4 iterations."""
    flags = data_flags(synthetic_coco) + TINY_DEFORMABLE_FLAGS[len(TINY_DETR_FLAGS):-6] + [
        "--enc_n_points", "2", "--dec_n_points", "2", "--with_box_refine", "--no_aux_loss", "--epochs", "1",
        "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "main.py", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed init (rank 0)" in proc.stdout
    assert os.path.exists(tmp_path / "checkpoint.pth")
