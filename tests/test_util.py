import argparse
import errno
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from util import box_ops
from util.checkpoint import fit_state_dict, load_checkpoint, model_state_from_checkpoint
from util.errors import UserInputError
from util.misc import (
    SmoothedValue,
    accuracy,
    cuda_device_index,
    first_host,
    get_rng_state,
    inverse_sigmoid,
    least_advanced,
    nested_tensor_from_tensor_list,
    process_placement,
    set_rng_state,
)
from util.output_dir import (
    continues_this_folder,
    holds_a_run,
    remove_temporary_files,
    stopped_before_first_checkpoint,
    write_atomically,
)

# ----------------------------------------------------------------------------- misc

def test_nested_tensor_pads_bottom_right_and_masks_padding():
    a = torch.rand(3, 4, 6)
    b = torch.rand(3, 5, 2)
    nt = nested_tensor_from_tensor_list([a, b])
    assert nt.tensors.shape == (2, 3, 5, 6)
    assert torch.equal(nt.tensors[0, :, :4, :6], a)
    assert torch.equal(nt.tensors[1, :, :5, :2], b)
    assert nt.tensors[0, :, 4:].abs().sum() == 0 and nt.tensors[1, :, :, 2:].abs().sum() == 0
    expected_mask = torch.ones(2, 5, 6, dtype=torch.bool)
    expected_mask[0, :4, :6] = False
    expected_mask[1, :5, :2] = False
    assert torch.equal(nt.mask, expected_mask)


def test_smoothed_value_window_and_global_average():
    v = SmoothedValue(window_size=2)
    for x in (1.0, 2.0, 6.0):
        v.update(x)
    assert v.global_avg == pytest.approx(3.0)
    assert v.avg == pytest.approx(4.0)
    assert v.value == 6.0


def test_accuracy_and_inverse_sigmoid():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(logits, torch.tensor([1, 1, 1]))[0].item() == pytest.approx(200 / 3)
    assert accuracy(logits[:0], torch.tensor([], dtype=torch.long))[0].item() == 0
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(torch.sigmoid(inverse_sigmoid(x)), x, atol=1e-6)


def test_least_advanced_names_another_process_never_the_caller():
    # the CI case: rank 1 froze right after its beat; rank 0's last beat is older, since it waits
    # inside the next step; the caller (rank 0) must name rank 1
    seen = {0: (3, 100.0, "epoch 0, step 2"), 1: (3, 101.0, "epoch 0, step 2")}
    assert least_advanced(seen, me=0, now=107.0) == "rank 1 last answered 6 s ago, at epoch 0, step 2"
    # of several others, fewest beats first (the one left behind), then the oldest
    seen = {0: (9, 50.0, "a"), 1: (9, 40.0, "b"), 2: (7, 60.0, "c"), 3: (7, 55.0, "d")}
    assert least_advanced(seen, me=3, now=70.0) == "rank 2 last answered 10 s ago, at c"
    assert least_advanced(seen, me=1, now=70.0) == "rank 3 last answered 15 s ago, at d"
    assert least_advanced({0: (1, 1.0, "x")}, me=0, now=2.0) is None


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"), ("node1,node2", "node1"), ("gpu[003-004,010],cpu1", "gpu003"), ("gpu[12,3]", "gpu12"),
    ("rack[2-4]-ib", "rack2-ib"), ("a-b-[09-12]", "a-b-09")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_process_placement_torchrun_slurm_or_none():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}
    assert process_placement(1, dict(torchrun)) == (3, 8, 1)  # torchrun (or submitit) wins
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "123456"}
    environ = dict(srun)
    assert process_placement(8, environ) == (5, 8, 1)
    # srun without torchrun: the rendezvous is the job's first node, on a port of the job id
    assert environ["MASTER_ADDR"] == "gpu07" and environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    environ = {**srun, "MASTER_ADDR": "head", "MASTER_PORT": "29500"}
    process_placement(8, environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("head", "29500")  # kept when given
    with pytest.raises(UserInputError, match="--world_size 4, but SLURM started 8 tasks"):
        process_placement(4, dict(srun))
    assert process_placement(1, dict(srun)) is None  # one process inside an allocation
    assert process_placement(1, {}) is None
    with pytest.raises(UserInputError, match="--world_size 8, but no launcher started the processes"):
        process_placement(8, {})


def test_cuda_device_index_is_the_local_rank_among_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [cuda_device_index(r) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a task bound to its own GPU
    assert cuda_device_index(3) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # CPU
    assert cuda_device_index(3) == 0


# ----------------------------------------------------------------------------- box_ops

def test_box_conversions_round_trip():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.1, 0.1]])
    xyxy = box_ops.box_cxcywh_to_xyxy(boxes)
    assert torch.allclose(xyxy[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    assert torch.allclose(box_ops.box_xyxy_to_cxcywh(xyxy), boxes)


def test_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    iou, union = box_ops.box_iou(a, b)
    # overlap 1, union 4 + 4 - 1 = 7; disjoint box: IoU 0, union 5
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 5.0]]))
    giou = box_ops.generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9 and 5x2 = 10
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, 0 - 5 / 10]]))
    assert torch.allclose(box_ops.paired_box_iou(a.expand(2, 4), b), iou[0])
    assert torch.allclose(box_ops.paired_generalized_box_iou(a.expand(2, 4), b), giou[0])


def test_paired_generalized_box_iou_is_the_diagonal_of_the_table():
    g = torch.Generator().manual_seed(0)
    boxes = box_ops.box_cxcywh_to_xyxy(torch.rand(2, 9, 4, generator=g, dtype=torch.float64) * 0.5 + 0.1)
    torch.testing.assert_close(box_ops.paired_generalized_box_iou(boxes[0], boxes[1]),
                               box_ops.generalized_box_iou(boxes[0], boxes[1]).diag(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- checkpoints

class _Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.class_embed = nn.Linear(4, classes)


class _Boom:
    """Unpickling this would run os.system: a safe loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch SHOULD_NOT_EXIST",))


def test_load_checkpoint_accepts_namespace_and_round_trips(tmp_path):
    net = _Net()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": net.state_dict(), "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    ckpt = load_checkpoint(str(path))
    assert ckpt["args"].lr == 1e-4 and ckpt["epoch"] == 3
    fresh = _Net()
    fit_state_dict(fresh, model_state_from_checkpoint(ckpt))
    assert torch.equal(fresh.body.weight, net.body.weight)


def test_load_checkpoint_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Boom()}, path)
    with pytest.raises(UserInputError, match="refusing to load"):
        load_checkpoint(str(path))
    assert not (tmp_path / "SHOULD_NOT_EXIST").exists()


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    (b"this is not a checkpoint", "corrupt or not a PyTorch file"),
])
def test_load_checkpoint_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserInputError, match=match) as err:
        load_checkpoint(str(path))
    assert str(path) in str(err.value)


def test_a_checkpoint_that_is_a_folder_or_a_log_says_what_it_is(tmp_path):
    with pytest.raises(UserInputError, match="is a folder: pass the checkpoint file in it") as err:
        load_checkpoint(str(tmp_path))
    assert str(tmp_path / "checkpoint.pth") in str(err.value)
    # a run's log.txt: the line names the problem, never torch's advice to load with weights_only=False
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n')
    with pytest.raises(UserInputError, match="corrupt or not a PyTorch file") as err:
        load_checkpoint(str(tmp_path / "log.txt"))
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": _Net().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserInputError, match="cut.pth"):
        load_checkpoint(str(path))


def test_model_state_layouts():
    sd = {"w": torch.zeros(1)}
    assert model_state_from_checkpoint({"model": sd}) is sd
    assert model_state_from_checkpoint({"ema": {"module": sd, "updates": 5}}) is sd
    assert model_state_from_checkpoint(sd) is sd
    with pytest.raises(UserInputError, match="no model weights"):
        model_state_from_checkpoint({"optimizer": {}, "epoch": 1})


def test_fit_state_dict_names_every_kind_of_mismatch():
    sd = _Net(classes=5).state_dict()
    with pytest.raises(UserInputError, match=r"shape mismatch: class_embed.*--finetune_drop_class_head"):
        fit_state_dict(_Net(classes=3), sd)
    sd_missing = {k: v for k, v in _Net().state_dict().items() if k != "body.bias"}
    with pytest.raises(UserInputError, match="missing keys: body.bias"):
        fit_state_dict(_Net(), sd_missing)
    sd_extra = {**_Net().state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(UserInputError, match="unexpected keys: extra.weight"):
        fit_state_dict(_Net(), sd_extra)


def test_fit_state_dict_drop_class_head_keeps_fresh_head():
    source = _Net(classes=5)
    target = _Net(classes=3)
    head_before = target.class_embed.weight.clone()
    fit_state_dict(target, source.state_dict(), drop_prefixes=("class_embed",))
    assert torch.equal(target.body.weight, source.body.weight)
    assert torch.equal(target.class_embed.weight, head_before)


# ----------------------------------------------------------------------------- the output folder

def test_write_atomically_flushes_the_file_and_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_atomically(tmp_path / "log.txt", lambda tmp: tmp.write_text("new"))
    assert (tmp_path / "log.txt").read_text() == "new"
    assert synced == [str(tmp_path / "log.txt.tmp"), str(tmp_path)]  # the data, then the rename


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "log.txt").write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_atomically(tmp_path / "log.txt", fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]
    assert (tmp_path / "log.txt").read_text() == "old"


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserInputError, match=r"no space left .* writing checkpoint.pth .* --resume") as err:
        write_atomically(tmp_path / "checkpoint.pth", full)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


def test_only_the_runs_own_temporary_files_are_removed(tmp_path):
    for name in ("checkpoint.pth.tmp", "eval/latest.pth.tmp", "sweep/run_b/checkpoint.pth.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"partial")
    removed = remove_temporary_files(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == ["checkpoint.pth.tmp",
                                                                            "eval/latest.pth.tmp"]
    assert (tmp_path / "sweep/run_b/checkpoint.pth.tmp").exists()  # another run's, maybe live


@pytest.mark.parametrize("files,holds,stopped", [
    ({}, False, False),
    ({"checkpoint.pth": ""}, True, False),
    ({"checkpoint0049.pth": ""}, True, False),
    ({"log.txt": '{"epoch": 0}\n'}, False, True),  # stopped between epoch 0's log line and its checkpoint
    ({"log.txt": '{"epoch": 0}\n{"epoch": 1}\n'}, True, False),  # its checkpoints deleted: a run to keep
    ({"log.txt": "written by hand\n"}, True, False),
    ({"iterations.jsonl": '{"epoch": 0, "step": 0}\n'}, False, True),
    ({"tb/events": ""}, False, True),
    ({"notes.md": ""}, False, False),
])
def test_what_counts_as_a_run(tmp_path, files, holds, stopped):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert holds_a_run(tmp_path) == holds
    assert stopped_before_first_checkpoint(tmp_path) == stopped


def test_resume_continues_this_folder_only_from_its_own_checkpoint(tmp_path):
    assert continues_this_folder(str(tmp_path / "checkpoint.pth"), tmp_path)
    assert continues_this_folder(str(tmp_path / "checkpoint0049.pth"), tmp_path)
    assert not continues_this_folder(str(tmp_path / "other" / "checkpoint.pth"), tmp_path)
    assert not continues_this_folder("https://example.com/detr-r50-e632da11.pth", tmp_path)
    assert not continues_this_folder("", tmp_path)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    torch.save({"rng": get_rng_state()}, tmp_path / "state.pth")
    expected = (random.random(), torch.rand(2), np.random.standard_normal(3))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(torch.load(tmp_path / "state.pth", weights_only=True)["rng"])
    got = (random.random(), torch.rand(2), np.random.standard_normal(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and (got[2] == expected[2]).all()
    set_rng_state(get_rng_state()[:3])  # a checkpoint written before numpy's state was kept
