"""SIGUSR2 (util/preemption.py, main.train): training stops at a step boundary, on every process
at the same step, with a mid-epoch checkpoint and one line; resuming from it gives the weights,
optimizer state, logs and everything else an uninterrupted run has, to the bit. A signal during
evaluation stops the run after the epoch's checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import engine
import main as detr_main
from datasets.synthetic import make_synthetic_coco
from util import preemption
from util.checkpoint import load_checkpoint

from conftest import REPO, TINY_DETR_FLAGS, assert_equal_states, run


@pytest.fixture
def restored_handlers():
    """run_cli installs SIGINT/SIGTERM handlers; the test process gets its own back."""
    signums = (signal.SIGINT, signal.SIGTERM, preemption.SIGNAL)
    previous = {signum: signal.getsignal(signum) for signum in signums}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_sigusr2_is_recorded_not_raised_and_the_earlier_handler_comes_back(restored_handlers):
    received = []
    signal.signal(preemption.SIGNAL, lambda signum, frame: received.append(signum))
    with preemption.recorded():
        assert not preemption.requested() and not preemption.requested_anywhere()
        os.kill(os.getpid(), preemption.SIGNAL)
        time.sleep(0.1)
        assert preemption.requested() and preemption.requested_anywhere()
    assert received == []
    os.kill(os.getpid(), preemption.SIGNAL)
    time.sleep(0.1)
    assert received == [preemption.SIGNAL]


def test_a_forked_worker_leaves_the_signal_to_the_main_process(restored_handlers):
    """DataLoader workers are forked with the handler: the signal neither ends them nor counts."""
    with preemption.recorded():
        child = os.fork()
        if child == 0:
            os.kill(os.getpid(), preemption.SIGNAL)
            time.sleep(0.1)
            os._exit(3 if preemption.requested() else 0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and not preemption.requested()


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """16 training images (8 steps of 1 image per process and epoch under torchrun), 4 for
    evaluation."""
    root = tmp_path_factory.mktemp("preemption_coco")
    info = make_synthetic_coco(str(root), num_train=16, num_val=4, image_size=96, seed=0)
    return str(root), str(info["num_classes"])


def tiny(coco, *flags):
    return [*TINY_DETR_FLAGS, "--coco_path", coco[0], "--num_classes", coco[1], *map(str, flags)]


def cli(argv, capsys):
    """main.run_cli(argv): (exit status, the lines it wrote on stderr)."""
    try:
        detr_main.run_cli([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith(("preempted:", "error:", "interrupted:"))]


def signal_self_on_call(monkeypatch, module, name, call):
    """module.name sends this process SIGUSR2 at its call-th call (0-based), before it runs."""
    real, calls = getattr(module, name), []

    def signalled(*args, **kwargs):
        if len(calls) == call:
            os.kill(os.getpid(), preemption.SIGNAL)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)


def contents(folder):
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and path.name != ".lock"}


def without_args(checkpoint):
    return {k: v for k, v in checkpoint.items() if k != "args"}


def assert_same_run(reference, resumed):
    """The final checkpoints hold the same tensors (model, optimizer, scheduler, matcher, EMA) and
    the logs the same lines."""
    assert_equal_states(without_args(load_checkpoint(str(reference / "checkpoint.pth"))),
                        without_args(load_checkpoint(str(resumed / "checkpoint.pth"))))
    for log_name in ("log.txt", "iterations.jsonl"):
        if (reference / log_name).exists():
            assert (resumed / log_name).read_text() == (reference / log_name).read_text(), log_name


def test_stopped_during_evaluation_then_mid_epoch_then_resumed_is_bit_identical(coco, tmp_path, capsys, monkeypatch,
                                                                               restored_handlers):
    """1 process, DAP-loss with the momentum matcher, 2 micro-batches per step, EMA, augmentation,
    a learning-rate drop: SIGUSR2 during epoch 0's evaluation stops the run after its checkpoint;
    resumed, SIGUSR2 in the second step of epoch 1 stops it there with a mid-epoch checkpoint
    (a resume with another batch size is refused); resumed again, it ends as the uninterrupted run."""
    flags = tiny(coco, "--epochs", 3, "--lr_drop", 2, "--batch_size", 2, "--accum_iter", 2, "--ema", "--loss",
                 "raw+dap", "--matcher", "dap", "--dap_cost_mode", "momentum", "--log_iterations")
    reference, out = tmp_path / "reference", tmp_path / "out"
    run(flags + ["--output_dir", str(reference)])
    checkpoint = out / "checkpoint.pth"
    hint = f"the last checkpoint is {checkpoint}: continue with --resume {checkpoint}"

    with monkeypatch.context() as patch:
        signal_self_on_call(patch, detr_main, "evaluate", 0)
        code, lines = cli(flags + ["--output_dir", out], capsys)
    assert code == preemption.EXIT_STATUS == 140
    assert lines == [f"preempted: stopped on SIGUSR2 after epoch 0; {hint}"]
    saved = load_checkpoint(str(checkpoint))
    assert saved["epoch"] == 0 and "partial_epoch" not in saved

    resume = flags + ["--output_dir", out, "--resume", checkpoint]
    with monkeypatch.context() as patch:  # 4 steps per epoch: the signal in epoch 1's second one
        signal_self_on_call(patch, engine, "train_step", 1)
        code, lines = cli(resume, capsys)
    assert code == 140 and lines == [f"preempted: stopped on SIGUSR2 in epoch 1 after 2 of its 4 steps; {hint}"]
    saved = load_checkpoint(str(checkpoint))
    partial = saved["partial_epoch"]
    assert saved["epoch"] == 0 and partial["steps_done"] == 2 and len(partial["rng_states"]) == 1
    assert partial["layout"] == {"processes": 1, "--device": "cpu", "--batch_size": 2, "--accum_iter": 2, "--seed": 42}
    assert partial["meters"]["loss"]["count"] == 4  # 2 steps of 2 micro-batches
    assert {"ema", "matcher"} <= set(saved) and saved["matcher"]
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    steps = [(r["epoch"], r["step"]) for r in map(json.loads, (out / "iterations.jsonl").read_text().splitlines())]
    assert steps == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert not list(out.rglob("*.tmp"))

    before = contents(out)
    code, lines = cli(resume + ["--batch_size", 4], capsys)
    assert code == 2 and lines == [f"error: --resume {checkpoint} stopped in the middle of epoch 1 with --batch_size "
                                   "2, but this run has --batch_size 4: resume with the same to continue that epoch"]
    assert contents(out) == before

    code, lines = cli(resume, capsys)
    assert code == 0 and lines == []
    assert_same_run(reference, out)


# ----------------------------------------------------------------------------- two processes (torchrun)


def torchrun(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "main.py", *map(str, argv)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def workers(process, timeout=120):
    """The two main.py processes that torchrun (process) started: its children."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == process.pid:
                children.append(int(entry))
        if len(children) == 2:
            return children
        time.sleep(0.2)
    raise AssertionError("torchrun's workers did not start")


def rank_of(pid):
    environ = open(f"/proc/{pid}/environ").read().split("\0")
    return int(dict(item.split("=", 1) for item in environ if "=" in item)["RANK"])


def test_torchrun_both_processes_stop_at_one_step_when_one_is_signalled_and_resume_bit_identical(coco, tmp_path):
    """2 gloo processes: SIGUSR2 to rank 1 alone (rank 0 learns of it through the step's reduction)
    mid-epoch; both stop after the same step, rank 0 saves; torchrun --resume ends as the
    uninterrupted run."""
    flags = tiny(coco, "--epochs", 2, "--batch_size", 1, "--print_freq", 1)
    reference, out = tmp_path / "reference", tmp_path / "out"
    process = torchrun(flags + ["--output_dir", reference])
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]

    process = torchrun(flags + ["--output_dir", out])
    try:
        for line in process.stdout:  # rank 0 prints every step
            if "Epoch: [0] [1/8]" in line:
                break
        rank_1 = next(pid for pid in workers(process) if rank_of(pid) == 1)
        os.kill(rank_1, preemption.SIGNAL)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 2 and lines[0] == lines[1], err[-3000:]  # one per process, the same step
    saved = load_checkpoint(str(out / "checkpoint.pth"))
    partial = saved["partial_epoch"]
    assert saved["epoch"] == -1 and 2 <= partial["steps_done"] < 8 and len(partial["rng_states"]) == 2
    assert f"in epoch 0 after {partial['steps_done']} of its 8 steps" in lines[0]

    process = torchrun(flags + ["--output_dir", out, "--resume", out / "checkpoint.pth"])
    stdout, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert f"continuing at epoch 0, step {partial['steps_done']}" in stdout
    assert_same_run(reference, out)
