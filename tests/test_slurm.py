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
import types

import pytest
import submitit
import torch

import main as detr_main
import run_with_submitit
from util.errors import TrainingDiverged, UserInputError

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
        (["--cluster", "local", "--nodes", "1", "--coco_path", str(tmp_path / "none")],
         "is not accessible from this machine (No such file or directory)"),
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


def coco_layout(root, categories=({"id": 1, "name": "a"},)):
    """The COCO folders and annotation files, without images: what the submission checks read."""
    for folder in ("train2017", "val2017", "annotations"):
        (root / folder).mkdir(parents=True)
    for image_set in ("train", "val"):
        data = {"images": [], "annotations": [], "categories": list(categories)}
        (root / "annotations" / f"instances_{image_set}2017.json").write_text(json.dumps(data))
    return str(root)


def test_submission_refuses_what_the_job_would_refuse(tmp_path, capsys, monkeypatch):
    """Flags main.py refuses, a batch that does not split over the job's processes, a --coco_path
    this machine cannot read or without the COCO layout, invalid categories, a missing checkpoint:
    one line, exit status 2, nothing submitted (they used to fail after the queue wait)."""
    submitted = []
    monkeypatch.setattr(run_with_submitit.submitit, "AutoExecutor", lambda **kwargs: submitted.append(kwargs))
    coco = coco_layout(tmp_path / "coco")
    no_annotations = tmp_path / "no_annotations"
    (no_annotations / "train2017").mkdir(parents=True)
    (no_annotations / "val2017").mkdir()
    bad_categories = coco_layout(tmp_path / "bad_categories", categories=({"id": 1}, {"id": 1}))
    cases = [
        (["--coco_path", coco, "--hidden_dim", "30", "--nheads", "4"], "not divisible by --nheads 4"),
        (["--coco_path", coco, "--eval"], "--eval evaluates the weights of a checkpoint"),
        (["--coco_path", coco, "--total_batch_size", "6", "--ngpus", "4"],
         "--total_batch_size 6 is not divisible by the job's 4 processes (--ngpus 4 x --nodes 1) x --accum_iter 1"),
        (["--coco_path", coco, "--total_batch_size", "8", "--ngpus", "2", "--accum_iter", "3"], "--accum_iter 3"),
        (["--coco_path", str(tmp_path / "elsewhere")], "not accessible from this machine"),
        (["--coco_path", str(no_annotations)], "instances_train2017.json does not exist"),
        (["--coco_path", bad_categories], "category id(s) [1] appear twice"),
        (["--coco_path", coco, "--finetune", str(tmp_path / "x.pth")], "x.pth: file not found on this machine"),
        ([], "--coco_path is not set"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_with_submitit.main(["--cluster", "local", "--nodes", "1", "--device", "cpu",
                                    "--output_dir", str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and expected in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    assert submitted == [] and not (tmp_path / "out").exists()
    # Fixed, the same flags pass.
    run_with_submitit.check_submission(launcher_args("--cluster", "local", "--device", "cpu", "--coco_path", coco,
                                                     "--total_batch_size", "8", "--ngpus", "2", "--nodes", "1",
                                                     "--accum_iter", "2"))


def launcher_args(*argv):
    return run_with_submitit.get_launcher_parser().parse_args(list(argv))


def test_submission_check_counts_cuda_of_the_job_node(tmp_path):
    """A SLURM job on --device cuda asks for GPUs: submitted from a login node without any, it
    passes main.check_args's CUDA check there, which still applies to every other check and to a
    local job; args are left as they were (check_args edits what it checks)."""
    coco = coco_layout(tmp_path / "coco")
    args = launcher_args("--cluster", "slurm", "--coco_path", coco, "--ngpus", "1", "--nodes", "1")
    before = vars(args).copy()
    run_with_submitit.check_submission(args)  # no error, with or without a GPU here
    assert vars(args) == before
    with pytest.raises(UserInputError, match="not divisible by --nheads"):
        run_with_submitit.check_submission(launcher_args("--cluster", "slurm", "--coco_path", coco, "--nheads", "7"))
    with pytest.raises(UserInputError, match="--device cudaa is not supported"):
        run_with_submitit.check_submission(launcher_args("--cluster", "slurm", "--coco_path", coco,
                                                         "--device", "cudaa"))
    if not torch.cuda.is_available():  # a local job runs here: no GPU, no job
        with pytest.raises(UserInputError, match="CUDA is not available"):
            run_with_submitit.check_submission(launcher_args("--cluster", "local", "--coco_path", coco))


def test_a_refusal_inside_the_job_is_one_line(tmp_path, capsys, monkeypatch):
    """main.py's refusals (a UserInputError once the job runs: a file that changed since the
    submission, the training annotations) end the job with main.py's one line and exit status,
    not with a traceback in the job's log."""
    job = types.SimpleNamespace(job_id="7", num_tasks=1)
    monkeypatch.setattr(run_with_submitit.submitit, "JobEnvironment", lambda: job)
    trainer = run_with_submitit.Trainer(launcher_args("--output_dir", str(tmp_path / "%j")))
    for error, status in [(UserInputError("annotation file x.json:\n  'images' must be a list"), 2),
                          (TrainingDiverged("the loss is nan at step 3"), 1)]:
        def refuse(args, error=error):
            raise error
        monkeypatch.setattr(detr_main, "main", refuse)
        with pytest.raises(SystemExit) as exit_info:
            trainer()
        assert exit_info.value.code == status
        assert capsys.readouterr().err == f"error: {error.one_line()}\n"
    assert (tmp_path / "7").is_dir()


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
