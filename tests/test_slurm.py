"""run_with_submitit.py: a job is submitted, interrupted mid-training, requeued, continues from
output_dir/checkpoint.pth (mid-epoch, where SIGUSR2 stopped it) and finishes every epoch exactly
once, in submitit's local mode (2 gloo processes) and on a real single-node SLURM cluster started
by scripts/slurm_local.sh.

How the interruptions are triggered (submitit 1.5.4):
* local mode: SIGUSR2 sent to the task processes (children of the controller). LocalJob._interrupt()
  signals the controller, which does not handle SIGUSR2 and dies, leaving the tasks unsignalled.
* SLURM: `scancel --signal=USR2` (what SLURM sends before a time limit: training stops at a step
  boundary with a mid-epoch checkpoint, then checkpoint() and `scontrol requeue` from inside the
  job), then `scontrol requeue` from outside (preemption without a signal: the job restarts from its
  original submission, and Trainer continues from the last checkpoint).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import submitit

import run_with_submitit

from conftest import REPO, TINY_DETR_FLAGS


@pytest.fixture(scope="module")
def requeue_coco(tmp_path_factory):
    """More training than evaluation images, so that a signal sent when an epoch's line reaches
    log.txt arrives while the next epoch trains."""
    from datasets.synthetic import make_synthetic_coco
    root = tmp_path_factory.mktemp("requeue_coco")
    info = make_synthetic_coco(str(root), num_train=16, num_val=2, image_size=96, seed=0)
    return str(root), info["num_classes"]


def launcher_argv(coco, output_dir, epochs, *extra):
    path, num_classes = coco
    return [*TINY_DETR_FLAGS, "--coco_path", path, "--num_classes", str(num_classes), "--batch_size", "2",
            "--epochs", str(epochs), "--output_dir", str(output_dir), "--nodes", "1", *extra]


def logged_epochs(output_dir):
    try:
        with open(os.path.join(output_dir, "log.txt")) as f:
            return [json.loads(line)["epoch"] for line in f]
    except FileNotFoundError:
        return []


def wait_for(condition, what, timeout=150, every=0.05):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def children(pid):
    """PIDs of the processes whose parent is pid (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry))
    return found


def check_finished(output_dir, epochs):
    """Every epoch logged once, in order; the last checkpoint is the last epoch."""
    from util.checkpoint import load_checkpoint
    assert load_checkpoint(os.path.join(output_dir, "checkpoint.pth"))["epoch"] == epochs - 1
    assert logged_epochs(output_dir) == list(range(epochs))


def resumed_epochs(text):
    return [int(epoch) for epoch in re.findall(r"checkpoint\.pth: continuing at epoch (\d+)", text)]


def test_local_job_checkpoints_requeues_and_resumes(requeue_coco, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # submit() extends it
    out, epochs = tmp_path / "out", 2
    job = run_with_submitit.main(launcher_argv(requeue_coco, out, epochs, "--cluster", "local", "--ngpus", "2"))
    # main.py logs an epoch, then checkpoints it: wait for both.
    wait_for(lambda: logged_epochs(out) == [0] and (out / "checkpoint.pth").exists(), "the first epoch")
    tasks = children(job._process.pid)
    assert len(tasks) == 2
    for pid in tasks:  # as SLURM does: every task gets the signal; both stop at one step, rank 0 requeues
        os.kill(pid, signal.SIGUSR2)
    results = job.results()  # one per task: main's last epoch stats
    assert [r["epoch"] for r in results] == [epochs - 1] * 2
    rank0 = job.task(0).stdout()
    assert "Caught signal SIGUSR2" in rank0 and "Calling checkpoint method" in rank0 and "Requeued job" in rank0
    lines = [re.findall(r"preempted: .*", job.task(task).stderr()) for task in (0, 1)]
    assert len(lines[0]) == 1 and lines[1] == lines[0]  # both tasks stopped after the same step
    assert lines[0][0].startswith("preempted: stopped on SIGUSR2 in epoch 1 after")
    assert resumed_epochs(rank0) == [1] and re.search(r"continuing at epoch 1, step [1-9]", rank0)  # mid-epoch
    check_finished(out, epochs)


def test_launcher_refuses_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    cases = [
        (["--coco_path", str(tmp_path)], "sbatch not found"),
        (["--cluster", "local", "--nodes", "2", "--coco_path", str(tmp_path)], "--nodes 1"),
        (["--cluster", "local", "--nodes", "1", "--coco_path", str(tmp_path / "none")], "is not a folder"),
        (["--cluster", "local", "--nodes", "1", "--coco_path", str(tmp_path), "--finetune", str(tmp_path / "x.pth")],
         "file not found"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_with_submitit.main(["--device", "cpu", *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and expected in err and "\n" not in err
    # Folders: the job's own under the output folder; without one, ./experiments/<job id>.
    args = run_with_submitit.get_launcher_parser().parse_args(["--output_dir", "o"])
    assert run_with_submitit.job_folders(args) == (os.path.abspath("o/submitit"), os.path.abspath("o"))
    args = run_with_submitit.get_launcher_parser().parse_args([])
    assert run_with_submitit.job_folders(args) == (os.path.abspath("experiments/%j"),) * 2


def test_continue_in_output_dir(tmp_path):
    options = {"output_dir": str(tmp_path), "finetune": "released.pth", "resume": "", "eval": False}
    assert run_with_submitit.continue_in_output_dir(options) is None and options["finetune"] == "released.pth"
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert run_with_submitit.continue_in_output_dir(dict(options, eval=True)) is None
    assert run_with_submitit.continue_in_output_dir(options) == str(tmp_path / "checkpoint.pth")
    assert options == {"output_dir": str(tmp_path), "finetune": "", "resume": str(tmp_path / "checkpoint.pth"),
                       "eval": False}


def test_a_job_out_of_time_is_requeued_only_if_it_trained_a_step(tmp_path, capsys):
    """At the time-limit signal a job stops at a step boundary with a mid-epoch checkpoint, so a
    requeued job advances (it is requeued, even without a whole epoch). One whose time ran out
    before it trained a step would never advance: it ends with one line. A job preempted before
    its time is used is requeued whatever its progress."""
    args = run_with_submitit.get_launcher_parser().parse_args(["--output_dir", str(tmp_path), "--timeout", "60"])
    trainer = run_with_submitit.Trainer(args)
    now = time.time()
    timed_out = run_with_submitit.timed_out
    assert timed_out(now - 48 * 60, 60, now) and not timed_out(now - 47 * 60, 60, now)  # 80 % of the limit
    assert timed_out(now - 20 * 60, 30, now) and not timed_out(now - 19 * 60, 30, now)  # all but 10 minutes

    trainer.started = now - 50 * 60  # its time used, no step trained
    assert trainer.checkpoint() is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("error: the job reached its time limit (--timeout 60 minutes) before it trained a step")
    assert str(tmp_path) in line and "\n" not in line

    trainer.advanced = True  # main.py stopped after a step and saved it: requeued
    assert isinstance(trainer.checkpoint(), submitit.helpers.DelayedSubmission)
    trainer.started, trainer.advanced = now - 5 * 60, False  # preempted early: requeued
    assert isinstance(trainer.checkpoint(), submitit.helpers.DelayedSubmission)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A slurmctld + slurmd on localhost; skipped where SLURM cannot be installed or started."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs Linux and root")
    state = tmp_path_factory.mktemp("slurm")
    script = os.path.join(REPO, "scripts", "slurm_local.sh")
    try:
        started = subprocess.run(["bash", script, "start", str(state)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", script, "stop", str(state)], capture_output=True)
        pytest.skip("SLURM could not be installed or started within 300 s")
    if started.returncode:
        subprocess.run(["bash", script, "stop", str(state)], capture_output=True)
        pytest.skip(f"SLURM could not be installed or started: {started.stderr.strip()[-500:]}")
    env = {"SLURM_CONF": str(state / "slurm.conf"), "PATH": f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    yield env
    subprocess.run(["scancel", "--user", "root"], env={**os.environ, **env}, capture_output=True)
    time.sleep(1)
    subprocess.run(["bash", script, "stop", str(state)], capture_output=True)


def test_slurm_job_survives_time_limit_signal_and_preemption(slurm_cluster, requeue_coco, tmp_path, monkeypatch):
    for key, value in slurm_cluster.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    # Enough epochs that the preempted job is killed (KillWait after SIGTERM, which submitit
    # ignores) before it has finished them all.
    out, epochs = tmp_path / "out", 6
    job = run_with_submitit.main(launcher_argv(requeue_coco, out, epochs, "--ngpus", "1", "--device", "cpu",
                                               "--cpus_per_task", "1", "--mem_gb", "1", "--timeout", "10"))

    def slurm(*cmd):
        subprocess.run(cmd, check=True, capture_output=True)

    def stdout():
        return job.stdout() or ""

    # main.py logs an epoch, then checkpoints it: wait for both.
    wait_for(lambda: logged_epochs(out) == [0] and (out / "checkpoint.pth").exists(), "the first epoch")
    slurm("scancel", "--signal=USR2", job.job_id)  # what SLURM sends before the time limit
    wait_for(lambda: len(resumed_epochs(stdout())) == 1 and logged_epochs(out)[-1:] == [resumed_epochs(stdout())[0]],
             "the requeued job's first epoch")
    slurm("scontrol", "requeue", job.job_id)  # preemption: restarts the original submission
    # submitit reads the state with sacct (the stand-in of slurm_local.sh)
    wait_for(lambda: job.get_info(mode="force").get("State") == "COMPLETED", "the job to complete", every=1)

    assert job.result()["epoch"] == epochs - 1  # main's last epoch stats
    text = stdout()
    assert text.count("Starting with JobEnvironment") == 3
    resumed = resumed_epochs(text)
    assert len(resumed) == 2 and 1 <= resumed[0] < resumed[1] <= epochs
    assert "Calling checkpoint method" in text and "Requeued job" in text
    # the time-limit signal stopped epoch 1 at a step boundary; the requeued job went on from there
    assert "preempted: stopped on SIGUSR2 in epoch 1 after" in job.stderr()
    assert re.search(r"continuing at epoch 1, step [1-9]", text)
    check_finished(out, epochs)


def test_srun_without_torchrun_trains_two_tasks(slurm_cluster, requeue_coco, tmp_path):
    """`srun --ntasks 2 python main.py --world_size 2`: each task takes its rank from SLURM and
    meets the other at the job's first node, on a port derived from the job id (torchrun, which
    would set MASTER_ADDR and MASTER_PORT, is not involved)."""
    # No rendezvous given, and no SLURM_* or SUBMITIT_* variables of the calling environment.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "SUBMITIT_")) and key not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(slurm_cluster, OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    argv = launcher_argv(requeue_coco, out, 1)[:-2]  # without the launcher's --nodes
    # --overcommit: the local cluster's node has as many CPUs as nproc says, 1 under OMP_NUM_THREADS=1
    srun = ["srun", "--nodes", "1", "--ntasks", "2", "--cpus-per-task", "1", "--overcommit"]
    proc = subprocess.run([*srun, sys.executable, "main.py", *argv, "--world_size", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 images per process x 2 processes" in proc.stdout
    check_finished(out, 1)
