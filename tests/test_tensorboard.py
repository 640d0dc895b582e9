"""util/tensorboard.py through main.py: the event files of a tiny training run hold, per step,
the values of iterations.jsonl and, per epoch, those of log.txt (the COCO numbers by name, DAP's
precision tables as images); a run killed and a run stopped mid-epoch continue the same curves
without a duplicated step; under torchrun rank 0 alone writes; without the tensorboard package
the run trains unchanged and says so once."""
import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main as detr_main
from util import preemption
from util.logs import COCO_STATS
from util.preemption import Preempted

from conftest import REPO, data_flags, run

TABLE_KEYS = ("train_dap_precision_table", "train_matcher_precision_table")
DAP_FLAGS = ["--loss", "raw+dap", "--matcher", "dap", "--dap_cost_mode", "momentum", "--dap_bins", "8"]
STEPS_PER_EPOCH = 4  # 8 synthetic training images, 2 per step


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(run_dir):
    """The run's TensorBoard events as TensorBoard reads them (what a resume purged left out)."""
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag):
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def assert_board_matches_logs(run_dir, epochs):
    """Every value of iterations.jsonl at its global step, once; every number of log.txt at its
    epoch's last step, once; the precision tables as one image per epoch."""
    board = events(run_dir)
    steps = read_jsonl(run_dir / "iterations.jsonl")
    assert [(r["epoch"], r["step"]) for r in steps] == [(e, s) for e in range(epochs) for s in range(STEPS_PER_EPOCH)]
    for name in steps[0]:
        if name in ("epoch", "step"):
            continue
        expected = [(r["epoch"] * STEPS_PER_EPOCH + r["step"], pytest.approx(r[name], rel=1e-6, abs=1e-30))
                    for r in steps]
        assert scalars(board, f"step/{name}") == expected, name
    assert [step for step, _ in scalars(board, "step/iter_time")] == list(range(epochs * STEPS_PER_EPOCH))

    log = read_jsonl(run_dir / "log.txt")
    assert [r["epoch"] for r in log] == list(range(epochs))
    epoch_ends = [(r["epoch"] + 1) * STEPS_PER_EPOCH - 1 for r in log]
    for name in log[0]:
        if name in ("epoch", "n_parameters", *TABLE_KEYS):
            continue
        if name == "test_coco_eval_bbox":
            for i, metric in enumerate(COCO_STATS):
                assert scalars(board, f"coco/{metric}") == [
                    (step, pytest.approx(r[name][i], rel=1e-6, abs=1e-30)) for step, r in zip(epoch_ends, log)]
        else:
            assert scalars(board, f"epoch/{name}") == [
                (step, pytest.approx(r[name], rel=1e-6, abs=1e-30)) for step, r in zip(epoch_ends, log)], name
    tables = [name for name in TABLE_KEYS if name in log[0]]
    assert [f"dap/{name}" for name in tables] == board.Tags()["images"]
    for name in tables:
        assert [e.step for e in board.Images(f"dap/{name}")] == epoch_ends


@pytest.fixture(scope="module")
def dap_run(synthetic_coco, tmp_path_factory):
    """2 epochs of DAP-loss with the momentum matcher, TensorBoard on by default."""
    out = tmp_path_factory.mktemp("tensorboard") / "dap"
    run(data_flags(synthetic_coco) + DAP_FLAGS + ["--output_dir", str(out), "--epochs", "2", "--log_iterations"])
    return out


def test_scalars_equal_the_logs(dap_run):
    assert_board_matches_logs(dap_run, epochs=2)
    assert set(read_jsonl(dap_run / "log.txt")[0]) >= set(TABLE_KEYS)
    board = events(dap_run)
    # losses with their auxiliary copies, learning rates, DAP's value and mean precision, gradient norm
    assert {"step/loss", "step/loss_ce", "step/loss_ce_0", "step/loss_dap", "step/loss_dap_0", "step/lr",
            "step/lr_group1", "step/dap_value", "step/dap_precision", "step/grad_norm", "epoch/test_loss",
            "coco/AP", "coco/ARl"} <= set(board.Tags()["scalars"])


def test_precision_tables_are_logged_per_epoch(dap_run):
    for row in read_jsonl(dap_run / "log.txt"):
        for name in TABLE_KEYS:
            table = row[name]
            assert len(table) == 10 and all(len(r) == 8 and all(0 <= p <= 1 for p in r) for r in table), name
    # the final layer's mean precision of the epoch's last step is the logged dap_precision of that step
    last_step = read_jsonl(dap_run / "iterations.jsonl")[-1]
    table = read_jsonl(dap_run / "log.txt")[-1]["train_dap_precision_table"]
    assert sum(map(sum, table)) / 80 == pytest.approx(last_step["dap_precision"], rel=1e-5)


def test_killed_then_stopped_mid_epoch_continues_the_same_curves(synthetic_coco, tmp_path, monkeypatch):
    """Killed between epoch 1's log line and its checkpoint (its steps and numbers already on the
    board), resumed from epoch 0's checkpoint, stopped on SIGUSR2 after epoch 1's second step,
    resumed again: every step and epoch on the board once, with the values of the final logs."""
    flags = data_flags(synthetic_coco) + DAP_FLAGS + ["--output_dir", str(tmp_path), "--epochs", "3",
                                                      "--log_iterations"]
    resume = ["--resume", str(tmp_path / "checkpoint.pth")]
    real_save = detr_main.save_checkpoint

    def killed_at_epoch_1(path, model, criterion, optimizer, lr_scheduler, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt("job killed")
        return real_save(path, model, criterion, optimizer, lr_scheduler, epoch, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(detr_main, "save_checkpoint", killed_at_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            run(flags)
    assert [step for step, _ in scalars(events(tmp_path), "step/loss")] == list(range(2 * STEPS_PER_EPOCH))

    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(preemption, "requested", lambda: calls.append(1) or len(calls) == 2)
        with pytest.raises(Preempted):
            run(flags + resume)
    assert [step for step, _ in scalars(events(tmp_path), "step/loss")] == list(range(STEPS_PER_EPOCH + 2))

    run(flags + resume)
    assert_board_matches_logs(tmp_path, epochs=3)


def test_a_run_resumed_with_another_batch_size_goes_on_from_its_steps_done(synthetic_coco, tmp_path):
    """The x axis counts the optimisation steps done (kept in the checkpoint), not epoch x steps
    per epoch: epoch 0 at batch 2 (4 steps), epoch 1 resumed at batch 4 (2 steps) is at 4 and 5."""
    flags = data_flags(synthetic_coco) + ["--output_dir", str(tmp_path), "--log_iterations"]
    run(flags + ["--epochs", "1"])
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["steps_done"] == STEPS_PER_EPOCH
    run(flags + ["--epochs", "2", "--batch_size", "4", "--resume", str(tmp_path / "checkpoint.pth")])
    assert [step for step, _ in scalars(events(tmp_path), "step/loss")] == list(range(STEPS_PER_EPOCH + 2))
    assert [step for step, _ in scalars(events(tmp_path), "coco/AP")] == [STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH + 1]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["steps_done"] == STEPS_PER_EPOCH + 2


def test_only_rank_0_writes(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
         *data_flags(synthetic_coco), "--batch_size", "1", "--epochs", "1", "--log_iterations",
         "--output_dir", str(out)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert_board_matches_logs(out, epochs=1)  # 2 processes x 1 image: 4 steps of 2 images


def test_without_the_package_training_runs_and_says_so_once(synthetic_coco, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails
    stats = run(data_flags(synthetic_coco) + ["--output_dir", str(tmp_path), "--epochs", "1"])
    assert len(stats["test_coco_eval_bbox"]) == 12 and (tmp_path / "checkpoint.pth").is_file()
    assert not (tmp_path / "tb").exists()
    assert capsys.readouterr().out.count("TensorBoard logging is off") == 1

    with pytest.raises(SystemExit) as exit_info:
        detr_main.run_cli(data_flags(synthetic_coco) + ["--tensorboard"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --tensorboard needs the tensorboard package: pip install tensorboard, or leave out --tensorboard")


def test_no_tensorboard_writes_no_events(synthetic_coco, tmp_path):
    run(data_flags(synthetic_coco) + ["--output_dir", str(tmp_path), "--epochs", "1", "--no_tensorboard"])
    assert not (tmp_path / "tb").exists() and (tmp_path / "log.txt").is_file()
