"""Global-batch DAP under data parallelism (spec section 4): two gloo processes with 4 images
each give the same losses as one process with the same 8 images, and gradients that, after
DDP's average over processes, are those of the single process."""
import argparse
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import main as detr_main
from models import build_model

NUM_IMAGES, NUM_QUERIES, NUM_CLASSES = 8, 12, 6


def criterion_for(flags):
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    args = detr_main.parse_args(parser, [
        "--device", "cpu", "--no_pretrained_backbone", "--backbone", "resnet18", "--hidden_dim", "16",
        "--dim_feedforward", "16", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2",
        "--num_queries", str(NUM_QUERIES), "--num_classes", str(NUM_CLASSES), *flags])
    return build_model(args)[1]


def make_batch(seed=0):
    """Outputs of a 2-layer softmax head for 8 images and their targets (1-4 boxes each); the
    predicted boxes are jittered copies of the image's ground truth, so IoUs span 0..1."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(NUM_IMAGES):
        n = int(torch.randint(1, 5, (1,), generator=g))
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes], -1)})

    def layer():
        logits = torch.randn(NUM_IMAGES, NUM_QUERIES, NUM_CLASSES + 1, generator=g, ) * 2
        boxes = torch.stack([t["boxes"][torch.randint(0, len(t["boxes"]), (NUM_QUERIES,), generator=g)]
                             for t in targets])
        jitter = torch.randn(boxes.shape, generator=g) * 0.03
        return logits, (boxes + jitter).clamp(0.02, 0.98)

    return [layer() for _ in range(2)], targets


def losses_and_grads(criterion, layers, targets, images):
    """Loss dict on the given images and the gradient of the weighted total w.r.t. the inputs."""
    leaves = [(lg[images].clone().requires_grad_(), bx[images].clone().requires_grad_()) for lg, bx in layers]
    outputs = {"pred_logits": leaves[-1][0], "pred_boxes": leaves[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in leaves[:-1]]}
    loss_dict = criterion(outputs, [targets[i] for i in images])
    total = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
    total.backward()
    grads = [g for leaf in leaves for g in (leaf[0].grad, leaf[1].grad)]
    return {k: v.detach() for k, v in loss_dict.items()}, grads


def _worker(rank, world_size, init_file, flags, result_queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    layers, targets = make_batch()
    per_rank = NUM_IMAGES // world_size
    images = list(range(rank * per_rank, (rank + 1) * per_rank))
    loss_dict, grads = losses_and_grads(criterion_for(flags), layers, targets, images)
    # NumPy, not tensors: torch would share tensor memory through a socket that disappears
    # when this process exits.
    result_queue.put((rank, {k: v.numpy() for k, v in loss_dict.items()}, [g.numpy() for g in grads]))
    dist.barrier()
    dist.destroy_process_group()


def run_two_processes(flags):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, 2, init_file, flags, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            rank, losses, grads = queue.get(timeout=120)
            results[rank] = ({k: torch.from_numpy(v) for k, v in losses.items()}, [torch.from_numpy(g) for g in grads])
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    return results


@pytest.mark.parametrize("flags", [
    ["--loss", "dap", "--matcher", "dap"],
    ["--loss", "dap", "--dap_num_gt", "0", "--dap_bins", "8", "--dap_sigma", "0.1"],
    ["--loss", "raw+dap", "--matcher", "dap", "--dap_cost_mode", "momentum"],
])
def test_two_processes_equal_one_process(flags):
    layers, targets = make_batch()
    single_losses, single_grads = losses_and_grads(criterion_for(flags), layers, targets, list(range(NUM_IMAGES)))
    results = run_two_processes(flags)

    assert single_losses["loss_dap"] < 0
    for key, value in single_losses.items():
        # What the engine logs: the average of the per-process values.
        averaged = (results[0][0][key] + results[1][0][key]) / 2
        if key.startswith("cardinality_error"):
            continue  # a per-image mean of each process: not a global-batch quantity
        assert torch.allclose(averaged, value.to(averaged.dtype), rtol=1e-5, atol=1e-7), key
    # DDP averages gradients over the 2 processes; the result is the single-process gradient.
    for rank in (0, 1):
        images = slice(rank * NUM_IMAGES // 2, (rank + 1) * NUM_IMAGES // 2)
        for single, local in zip(single_grads, results[rank][1]):
            assert torch.allclose(local / 2, single[images], rtol=1e-4, atol=1e-8)
