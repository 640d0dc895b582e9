"""engine.py: mixed precision (--amp) — the float32 copies the criterion sees, the GradScaler
step against a plain step, overflow handling, --amp end to end on the CPU (bfloat16) — and the
counting pass of accumulated DAP steps (same random draws as the gradient pass, buffers kept).
That accumulation gives the gradients of one batch is tested in test_dap_distributed.py (the
criterion) and test_main.py (end to end). Also: what a training step reads back to the host."""
import collections
import copy
import math
import os
import traceback
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import util.misc as utils
from engine import MixedPrecision, train_step
from models import build_model
from models.set_criterion import BaseSetCriterion

from conftest import (
    DEFORMABLE_VARIANTS,
    REPO,
    TINY_DEFORMABLE_FLAGS,
    TINY_DETR_FLAGS,
    TINY_RTDETR_FLAGS,
    data_flags,
    parse,
    rtdetr_targets,
    run,
)


def test_disabled_mixed_precision_changes_nothing():
    amp = MixedPrecision("cpu", enabled=False)
    outputs = {"pred_logits": torch.zeros(2, dtype=torch.bfloat16)}
    assert amp.float32(outputs) is outputs
    with amp.autocast():
        assert nn.Linear(3, 2)(torch.randn(4, 3)).dtype == torch.float32
    assert not amp.scaler.is_enabled()


def test_float32_copies_every_half_tensor_at_any_depth():
    amp = MixedPrecision("cpu", enabled=True)
    assert amp.dtype == torch.bfloat16 and not amp.scaler.is_enabled()  # no scaler without float16
    with amp.autocast():
        assert nn.Linear(3, 2)(torch.randn(4, 3)).dtype == torch.bfloat16
    logits = torch.randn(2, 3).to(torch.bfloat16)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(2, 4, dtype=torch.float16),
               "aux_outputs": [{"pred_logits": logits}], "dn_meta": {"dn_num_split": [4, 10], "pad": 2},
               "indices": (torch.arange(3),), "already": torch.ones(2, dtype=torch.float64)}
    cast = amp.float32(outputs)
    assert cast["pred_logits"].dtype == cast["pred_boxes"].dtype == cast["aux_outputs"][0]["pred_logits"].dtype \
        == torch.float32
    assert torch.equal(cast["pred_logits"], logits.float())
    assert cast["dn_meta"] == {"dn_num_split": [4, 10], "pad": 2}
    assert isinstance(cast["indices"], tuple) and cast["indices"][0].dtype == torch.int64
    assert cast["already"].dtype == torch.float64


class Scale(nn.Module):
    """Elementwise only: autocast leaves it in float32, so with the scaler on, the scaling is
    the only difference from a plain step."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -2.0, 3.0]))

    def forward(self, samples, targets):
        return {"pred": self.w * samples}


class SquaredError(nn.Module):
    weight_dict = {"loss_sq": 1.0}
    needs_counting_pass = False

    def __init__(self, factor=1.0):
        super().__init__()
        self.factor = factor

    def forward(self, outputs, targets, step=None):
        return {"loss_sq": self.factor * ((outputs["pred"] - 1) ** 2).sum()}


def one_step(amp, factor=1.0, max_norm=0.0, metric_logger=None):
    torch.manual_seed(0)
    model = Scale()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = [(torch.tensor([1.0, 2.0, -1.0]), [{"image_id": torch.tensor([0])}]),
            (torch.tensor([0.5, 1.0, 2.0]), [{"image_id": torch.tensor([1])}])]  # two micro-batches
    train_step(model, SquaredError(factor), step, optimizer, "cpu", max_norm, metric_logger or utils.MetricLogger(),
               amp)
    return model.w.detach()


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_scaled_step_is_the_plain_step(max_norm):
    # The scale is a power of two: scaling and unscaling are exact, also before clipping.
    scaled = MixedPrecision("cpu", enabled=True, use_scaler=True)
    assert scaled.scaler.get_scale() == 2.0 ** 16
    plain = one_step(MixedPrecision("cpu", enabled=False), max_norm=max_norm)
    assert not torch.equal(plain, torch.tensor([0.5, -2.0, 3.0]))
    assert torch.equal(one_step(scaled, max_norm=max_norm), plain)


def test_overflowing_step_is_skipped_and_the_scale_lowered():
    # A finite loss whose scaled gradient overflows float32: no update, half the scale; its
    # infinite gradient norm stays out of the epoch's average.
    amp = MixedPrecision("cpu", enabled=True, use_scaler=True)
    meters = utils.MetricLogger()
    assert torch.equal(one_step(amp, factor=1e34, metric_logger=meters), torch.tensor([0.5, -2.0, 3.0]))
    assert amp.scaler.get_scale() == 2.0 ** 15
    assert "grad_norm" not in meters.meters
    one_step(amp, metric_logger=meters)
    assert math.isfinite(meters.meters["grad_norm"].global_avg)


def test_amp_trains_detr_with_dap_in_bfloat16_on_the_cpu(synthetic_coco, tmp_path):
    flags = data_flags(synthetic_coco) + ["--epochs", "1", "--loss", "raw+dap", "--matcher", "dap"]
    full = run(flags + ["--output_dir", str(tmp_path / "fp32")])
    mixed = run(flags + ["--output_dir", str(tmp_path / "amp"), "--amp"])
    assert len(mixed["test_coco_eval_bbox"]) == 12
    # same data, same initial weights: close, but not equal (the forward ran in bfloat16)
    assert mixed["train_loss"] != full["train_loss"]
    assert mixed["train_loss"] == pytest.approx(full["train_loss"], rel=0.05)
    assert mixed["train_loss_dap"] == pytest.approx(full["train_loss_dap"], rel=0.05, abs=0.02)


def test_grad_scaler_state_is_checkpointed_and_resumed(synthetic_coco, tmp_path, monkeypatch):
    # The scaler runs only on CUDA; forced on here, so that its checkpointing runs on the CPU.
    import main as detr_main
    monkeypatch.setattr(detr_main, "MixedPrecision",
                        lambda device, enabled: MixedPrecision(device, enabled, use_scaler=True))
    flags = data_flags(synthetic_coco) + ["--amp", "--output_dir", str(tmp_path)]
    run(flags + ["--epochs", "1"])
    path = tmp_path / "checkpoint.pth"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["scaler"]["scale"] == 2.0 ** 16
    checkpoint["scaler"]["scale"] = 1024.0  # a scale the run could not have reached by itself
    torch.save(checkpoint, path)
    run(flags + ["--epochs", "2", "--resume", str(path)])
    assert torch.load(path, weights_only=False)["scaler"]["scale"] == 1024.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_amp_on_cuda_uses_float16_and_the_grad_scaler(synthetic_coco, tmp_path):
    amp = MixedPrecision("cuda", enabled=True)
    assert amp.dtype == torch.float16 and amp.scaler.is_enabled()
    stats = run(data_flags(synthetic_coco) + ["--device", "cuda", "--amp", "--epochs", "1", "--loss", "raw+dap",
                                              "--output_dir", str(tmp_path)])
    assert len(stats["test_coco_eval_bbox"]) == 12
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["scaler"]["scale"] > 0


# ----------------------------------------------------------------------------- counting pass

def accumulated_flags(model, data):
    """Two micro-batches of one image per step; DETR and Deformable DETR (two-stage: DAP on the
    encoder proposals too) with their dropout, RT-DETR with its denoising noise and multi-scale
    input size: random draws in every forward."""
    path, num_classes = data
    accumulation = ["--batch_size", "1", "--accum_iter", "2", "--epochs", "1"]
    if model == "detr":
        return data_flags(data) + accumulation
    if model == "deformable_detr":
        return (TINY_DEFORMABLE_FLAGS + DEFORMABLE_VARIANTS["two_stage"] + accumulation
                + ["--num_feature_levels", "2", "--coco_path", path, "--num_classes", str(num_classes)])
    # input scale 0.2: several multi-scale sizes (96, 128, 160); at 0.1 they all round to 64
    return TINY_RTDETR_FLAGS + ["--coco_path", path, "--batch_size", "1", "--accum_iter", "2", "--epochs", "1",
                                "--input_scale", "0.2"]


@pytest.mark.parametrize("model", ["detr", "deformable_detr", "rtdetr"])
def test_counting_pass_draws_what_the_gradient_pass_draws(model, synthetic_coco, monkeypatch):
    checked = []
    original = BaseSetCriterion.compute

    def compute(self, outputs, targets, step, raw_losses=True):
        losses, dap_results = original(self, outputs, targets, step, raw_losses)
        if raw_losses and step.counted is not None and step.counted[step.micro_batch] is not None:
            counted = step.counted[step.micro_batch]  # this pass's counts against the counting pass's
            assert dap_results.keys() == counted.keys()
            for name, result in dap_results.items():
                assert all(torch.equal(a, b) for a, b in zip(result.record.counts, counted[name].counts, strict=True))
            checked.append(step.micro_batch)
        return losses, dap_results

    monkeypatch.setattr(BaseSetCriterion, "compute", compute)
    flags = accumulated_flags(model, synthetic_coco) + ["--loss", "raw+dap"]
    run(flags)
    assert checked[:2] == [0, 0]  # the last micro-batch counts itself in its gradient pass
    # The check can fail: without restoring the random state the passes draw differently.
    monkeypatch.setattr(utils, "set_rng_state", lambda state: None)
    with pytest.raises(AssertionError):
        run(flags)


class Normalised(nn.Module):
    """A batch norm (statistics kept in training) and dropout (random draws) before a scale."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)
        self.w = nn.Parameter(torch.tensor([0.5, -2.0, 3.0]))

    def forward(self, samples, targets):
        return {"pred": self.w * self.drop(self.norm(samples))}


class CountingCriterion(SquaredError):
    """The DAP protocol without DAP: count() and score() record what they saw; the records are
    the predictions, so the gradient pass can check the other micro-batches' against a forward."""
    needs_counting_pass = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def count(self, outputs, targets, step):
        self.calls.append(("count", step.micro_batch))
        return {"": outputs["pred"].detach().clone()}

    def score(self, outputs, targets, step):
        self.calls.append(("score", step.micro_batch, step.is_last))
        return super().forward(outputs, targets, step), {"": outputs["pred"].detach().clone()}

    def forward(self, outputs, targets, step=None):
        self.calls.append(("forward", step.micro_batch, step.is_last, [c[""] for c in step.counted]))
        return super().forward(outputs, targets, step)


def micro_batches(count):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), [{"image_id": torch.tensor([i])}]) for i in range(count)]


def test_accumulated_dap_step_counts_all_but_the_last_micro_batch_and_keeps_statistics_and_draws():
    # Three micro-batches: counting forwards for the first two, then the gradient passes, the
    # last micro-batch first (it counts itself). The random draws are those of the micro-batches
    # in order, and the generator ends where drawing them in order leaves it; batch-norm
    # statistics are those of the three gradient forwards (the last micro-batch's first).
    step = micro_batches(3)
    torch.manual_seed(0)
    model, criterion = Normalised(), CountingCriterion()
    initial = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = torch.get_rng_state()
    train_step(model, criterion, step, optimizer, "cpu", 0, utils.MetricLogger(), MixedPrecision("cpu", False))
    rng_after_step = torch.get_rng_state()
    assert [c[:2] for c in criterion.calls] == [("count", 0), ("count", 1), ("score", 2), ("forward", 0),
                                                ("forward", 1)]
    assert [c[2] for c in criterion.calls[2:]] == [False, False, True]  # the momentum table moves once

    torch.set_rng_state(rng)
    in_order = copy.deepcopy(initial)
    drawn = [in_order(samples, None)["pred"].detach() for samples, _ in step]
    assert torch.equal(rng_after_step, torch.get_rng_state())
    for i, records in enumerate(criterion.calls[-1][3]):  # what the last gradient pass was handed
        assert torch.equal(records, drawn[i]), i

    last_first = copy.deepcopy(initial)
    for i in (2, 0, 1):
        last_first(step[i][0], None)
    for name, buffer in last_first.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    assert not torch.equal(model.norm.running_mean, in_order.norm.running_mean)  # the order shows


def test_each_micro_batch_is_copied_to_the_device_once():
    """The counting pass and the gradient pass read the same device copy of a micro-batch (a
    copy from the host per pass doubled the transfers of an accumulated step)."""
    copies = []

    class HostBatch:
        def __init__(self, tensor):
            self.tensor = tensor

        def to(self, device, non_blocking=False):
            copies.append((id(self), non_blocking))
            return self.tensor

    step = [(HostBatch(samples), targets) for samples, targets in micro_batches(3)]
    torch.manual_seed(0)
    model, criterion = Normalised(), CountingCriterion()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, criterion, step, optimizer, "cpu", 0, utils.MetricLogger(), MixedPrecision("cpu", False))
    assert sorted(copies) == sorted((id(batch), True) for batch, _ in step)
    assert [c[0] for c in criterion.calls] == ["count", "count", "score", "forward", "forward"]


# ----------------------------------------------------------------------------- host reads

class HostReads:
    """Counts what would make the host wait for a GPU in a training step, run on the CPU: every
    read of a tensor's values on the host (item, tolist, numpy, cpu, bool/float/int of a tensor)
    and every operator whose output size depends on the values (nonzero, boolean-mask indexing,
    unique, masked_select). Each is keyed by the function of the repository that made it.
    Reads inside torch.optim are left out: the optimizers keep their step counters on the host."""

    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}
    SIZE_FROM_VALUES = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
                        "unique_consecutive"}

    def __init__(self):
        self.events = collections.Counter()
        self.reading = 0
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                read = getattr(func, "__name__", "") in HostReads.READS
                if read:
                    counter.record(func.__name__)
                counter.reading += read
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    counter.reading -= read

        class Operators(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                mask_index = name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                    isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1])
                if not counter.reading and (name in HostReads.SIZE_FROM_VALUES or mask_index):
                    counter.record(name)
                return func(*args, **(kwargs or {}))

        self.modes = [Functions(), Operators()]

    def record(self, what):
        frames = traceback.extract_stack()[:-2]
        if any(f"torch{os.sep}optim" in f.filename for f in frames):
            return
        own = [f for f in frames if f.filename.startswith(REPO) and f"{os.sep}tests{os.sep}" not in f.filename]
        where = f"{os.path.relpath(own[-1].filename, REPO)}:{own[-1].name}" if own else "?"
        self.events[(what, where)] += 1

    def __enter__(self):
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def sync_counting_step(flags, micro_batches, counter=HostReads, device="cpu"):
    """The tiny model of `flags`, one warm-up step and one training step of `micro_batches`
    micro-batches of 2 images, counted by `counter` (a context manager). Returns (the counter,
    layers matched in the counted step)."""
    torch.manual_seed(0)
    args = parse(flags + ["--device", device])
    model, criterion, _ = build_model(args)
    model.to(device)
    model.train()
    criterion.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = [(utils.nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 64, 80)]), rtdetr_targets())
            for _ in range(micro_batches)]
    amp = MixedPrecision(device, False)
    train_step(model, criterion, step, optimizer, device, 0.1, utils.MetricLogger(), amp)
    matched = collections.Counter()
    original = criterion.matcher.forward

    def counting_matcher(*a, **k):
        matched["layers"] += 1
        return original(*a, **k)

    criterion.matcher.forward = counting_matcher
    with counter() as counted:
        train_step(model, criterion, step, optimizer, device, 0.1, utils.MetricLogger(), amp)
    return counted, matched["layers"]


SYNC_CASES = {
    "detr": TINY_DETR_FLAGS + ["--num_classes", "5"],
    "deformable_detr": TINY_DEFORMABLE_FLAGS + DEFORMABLE_VARIANTS["two_stage"],
    "rtdetr": TINY_RTDETR_FLAGS,
}


def sync_case_flags(model, loss):
    """--loss dap runs with the AP-cost matcher; RT-DETR's query selection is trained by the loss
    where it replaces the classification loss (dap, ap, rs)."""
    selection = ["--no_iou_aware_query_selection"] if model == "rtdetr" and loss in ("dap", "ap", "alrp", "rs") else []
    return SYNC_CASES[model] + ["--loss", loss] + (["--matcher", "dap"] if loss == "dap" else []) + selection


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("loss", ["raw", "dap", "raw+dap", "ap", "alrp", "rs"])
@pytest.mark.parametrize("model", sorted(SYNC_CASES))
def test_a_training_step_reads_the_device_once_per_matched_layer_and_once_to_log(model, loss, micro_batches):
    """The host waits for the GPU at each read: a step reads the matching cost of each matched
    layer (the assignment runs on the host), and once the step's logged values and gradient
    norm. Nothing else: no per-value logging reads, no shape or count read back, no boolean
    masks. (On a GPU, torch.cuda.set_sync_debug_mode checks the same: see test_..._on_a_gpu.)"""
    reads, matched_layers = sync_counting_step(sync_case_flags(model, loss), micro_batches)
    assignment = "models/dap_matcher.py:forward" if loss == "dap" else "models/matcher.py:assign_per_image"
    assert matched_layers > 0
    assert dict(reads.events) == {("cpu", assignment): matched_layers, ("tolist", "engine.py:read_step_values"): 1}


class CudaSyncs:
    """Counts the synchronising CUDA calls torch reports (set_sync_debug_mode 'warn')."""

    def __enter__(self):
        self.caught = warnings.catch_warnings(record=True)
        self.warnings = self.caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self.caught.__exit__(*exc)
        self.count = sum("synchronizing" in str(w.message) for w in self.warnings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("loss", ["raw", "dap", "raw+dap", "ap", "rs"])
@pytest.mark.parametrize("model", sorted(SYNC_CASES))
def test_a_training_step_synchronises_once_per_matched_layer_and_once_to_log_on_a_gpu(model, loss):
    syncs, matched_layers = sync_counting_step(sync_case_flags(model, loss), 2, CudaSyncs, "cuda")
    assert 0 < syncs.count <= matched_layers + 1
