"""Global-batch DAP (docs/DAP.md, section 5) and ranking losses (docs/LOSSES.md) under data
parallelism and gradient accumulation: 2 gloo processes with 4 images each, 1 process with 2
accumulated micro-batches of 4, or 2 x 2 x 2 give the same losses as one process with the same 8
images, and gradients that, after DDP's average over processes, are those of the single batch."""
import argparse
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import main as detr_main
from models import build_model
from models.set_criterion import StepContext

NUM_IMAGES, NUM_QUERIES, NUM_CLASSES = 8, 12, 6


def criterion_for(flags):
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    args = parser.parse_args([
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


def step_losses_and_grads(criterion, layers, targets, images, micro_batches=1):
    """One optimisation step of the criterion on the given images, as the engine runs it: with
    several micro-batches, a counting pass (criterion.count) of all but the last, then each
    micro-batch with its StepContext (the last first, counting itself: criterion.score), its
    weighted total divided by their number. Returns the loss dict averaged over
    the micro-batches (what the engine logs) and the gradients w.r.t. the head outputs, per
    layer and output, over the images in order."""
    chunks = [images[len(images) * i // micro_batches:len(images) * (i + 1) // micro_batches]
              for i in range(micro_batches)]
    step_targets = [[targets[i] for i in chunk] for chunk in chunks]
    leaves = [[(lg[chunk].clone().requires_grad_(), bx[chunk].clone().requires_grad_()) for lg, bx in layers]
              for chunk in chunks]

    def outputs(chunk_leaves):
        return {"pred_logits": chunk_leaves[-1][0], "pred_boxes": chunk_leaves[-1][1],
                "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in chunk_leaves[:-1]]}

    counted, order = None, range(micro_batches)
    if micro_batches > 1 and criterion.needs_counting_pass:  # the last micro-batch counts itself, first
        counted = [criterion.count(outputs(leaves[i]), step_targets[i], StepContext(step_targets, i))
                   for i in range(micro_batches - 1)] + [None]
        order = [micro_batches - 1, *range(micro_batches - 1)]
    logged = {}
    for position, i in enumerate(order):
        context = StepContext(step_targets, i, counted, final_call=position == micro_batches - 1)
        if counted is not None and counted[i] is None:
            loss_dict, counted[i] = criterion.score(outputs(leaves[i]), step_targets[i], context)
        else:
            loss_dict = criterion(outputs(leaves[i]), step_targets[i], context)
        total = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
        (total / micro_batches).backward()
        logged[i] = {k: v.detach() for k, v in loss_dict.items()}
    averaged = {k: sum(logged[i][k] for i in range(micro_batches)) / micro_batches for k in logged[0]}
    grads = [torch.cat([chunk_leaves[layer][j].grad for chunk_leaves in leaves])
             for layer in range(len(layers)) for j in range(2)]
    return averaged, grads


def _worker(rank, world_size, init_file, flags, micro_batches, result_queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    layers, targets = make_batch()
    per_rank = NUM_IMAGES // world_size
    images = list(range(rank * per_rank, (rank + 1) * per_rank))
    criterion = criterion_for(flags)
    loss_dict, grads = step_losses_and_grads(criterion, layers, targets, images, micro_batches)
    # NumPy, not tensors: torch would share tensor memory through a socket that disappears
    # when this process exits.
    result_queue.put((rank, {k: v.numpy() for k, v in loss_dict.items()}, [g.numpy() for g in grads],
                      criterion.matcher.state_dict().get("precision", torch.zeros(0)).numpy()))
    dist.barrier()
    dist.destroy_process_group()


def run_two_processes(flags, micro_batches=1):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, 2, init_file, flags, micro_batches, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            rank, losses, grads, precision = queue.get(timeout=120)
            results[rank] = ({k: torch.from_numpy(v) for k, v in losses.items()}, [torch.from_numpy(g) for g in grads],
                             torch.from_numpy(precision))
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    return results


@pytest.mark.parametrize("processes,micro_batches", [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("flags", [
    ["--loss", "dap", "--matcher", "dap"],
    ["--loss", "dap", "--dap_num_gt", "0", "--dap_bins", "8", "--dap_sigma", "0.1"],
    ["--loss", "raw+dap", "--matcher", "dap", "--dap_cost_mode", "momentum"],
    # sigmoid head: the logits' 7 columns are 7 classes; negatives are each image's top-k pairs
    ["--model", "deformable_detr", "--hidden_dim", "32", "--num_classes", "7", "--loss", "raw+dap",
     "--matcher", "dap", "--dap_cost_mode", "momentum", "--dap_neg_topk", "20"],
    # the ranking losses (docs/LOSSES.md): ranks over the step's whole batch
    ["--loss", "ap"],
    ["--loss", "rs", "--matcher", "dap"],
    ["--loss", "alrp"],
    ["--model", "deformable_detr", "--hidden_dim", "32", "--num_classes", "7", "--loss", "ap", "--dap_neg_topk", "20"],
    ["--model", "deformable_detr", "--hidden_dim", "32", "--num_classes", "7", "--loss", "rs", "--dap_neg_topk", "20"],
    ["--model", "deformable_detr", "--hidden_dim", "32", "--num_classes", "7", "--loss", "alrp",
     "--dap_neg_topk", "20"],
])
def test_processes_and_accumulation_equal_one_batch(flags, processes, micro_batches):
    """8 images as 2 processes x 4, 1 process x 2 accumulated micro-batches of 4, or 2 x 2 x 2:
    the same logged losses, gradients and momentum table as one batch of 8."""
    layers, targets = make_batch()
    single = criterion_for(flags)
    single_losses, single_grads = step_losses_and_grads(single, layers, targets, list(range(NUM_IMAGES)))
    single_precision = single.matcher.state_dict().get("precision", torch.zeros(0))
    if processes == 1:
        criterion = criterion_for(flags)
        losses, grads = step_losses_and_grads(criterion, layers, targets, list(range(NUM_IMAGES)), micro_batches)
        results = {0: (losses, grads, criterion.matcher.state_dict().get("precision", torch.zeros(0)))}
    else:
        results = run_two_processes(flags, micro_batches)

    batch_loss = single.batch_loss.name
    assert single_losses[f"loss_{batch_loss}"] < 0 if batch_loss == "dap" else single_losses[f"loss_{batch_loss}"] > 0
    for key, value in single_losses.items():
        # What the engine logs: the average of the per-process values.
        averaged = sum(results[r][0][key] for r in results) / processes
        if key.startswith(("cardinality_error", "class_error")):
            continue  # logged per micro-batch: not global-batch quantities
        assert torch.allclose(averaged, value.to(averaged.dtype), rtol=1e-5, atol=1e-7), key
    # DDP averages gradients over the processes; the result is the single-batch gradient.
    for rank in results:
        images = slice(rank * NUM_IMAGES // processes, (rank + 1) * NUM_IMAGES // processes)
        for single_grad, local in zip(single_grads, results[rank][1]):
            assert torch.allclose(local / processes, single_grad[images], rtol=1e-4, atol=1e-8)
        # The momentum matcher moved once, with the precision of the whole batch.
        assert torch.allclose(results[rank][2], single_precision, rtol=1e-5, atol=1e-7)
    if "momentum" in flags:
        assert not torch.equal(single_precision, criterion_for(flags).matcher.precision)


def test_gradient_pass_reuses_the_counting_pass_matching(monkeypatch):
    # Two micro-batches, 2 layers: the counting pass matches micro-batch 0 (2 calls), the
    # gradient pass of micro-batch 1 matches it (2 calls), and micro-batch 0's gradient pass reuses
    # its counted matching (no call); the equality tests above show the result is unchanged.
    criterion = criterion_for(["--loss", "raw+dap", "--matcher", "dap", "--dap_cost_mode", "momentum"])
    layers, targets = make_batch()
    calls = []
    matcher_class = type(criterion.matcher)
    match = matcher_class.forward
    monkeypatch.setattr(matcher_class, "forward", lambda self, o, t: calls.append(len(t)) or match(self, o, t))
    step_losses_and_grads(criterion, layers, targets, list(range(NUM_IMAGES)), micro_batches=2)
    assert calls == [NUM_IMAGES // 2] * 4
