"""Launch main.py on SLURM through submitit; the job checkpoints and requeues itself when it is
preempted or reaches its time limit, and continues from output_dir/checkpoint.pth.

SLURM signals every task with SIGUSR2 ahead of both (90 s before the time limit). main.py records
it, every process stops at the same step boundary, rank 0 writes a mid-epoch checkpoint, and
then Trainer hands the signal to submitit's handler: on rank 0 it calls Trainer.checkpoint() and
requeues the job, which continues the epoch at the next step, exactly (docs/RELIABILITY.md).

    python run_with_submitit.py --nodes 2 --ngpus 8 --timeout 1440 --partition gpu \
        --output_dir outputs/detr_r50_dap --coco_path /data/coco [main.py flags]
    python run_with_submitit.py --cluster local --ngpus 2 --device cpu ...   # on this machine

Every main.py flag is accepted (same parser, same per-model defaults). --ngpus is the number of
processes per node: one per GPU, or CPU processes (gloo) with --device cpu. The output folder and
--job_dir (submitit's logs and pickles; default <output_dir>/submitit) must be on a file system
that every node sees.

Nothing is submitted unless main.py's checks that need no compute node pass here (check_submission:
the flags, the batch split over the job's processes, --coco_path and its annotations, the
--finetune / --resume files), so a job does not wait in the queue to fail on its first line. --coco_path
and checkpoint paths are read from this machine at the path the job uses: on a cluster, a shared file
system. Inside the job, a refusal of main.py is one line in its log, as on the command line.
"""
import copy
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import submitit

import main as detr_main
from datasets.coco import LAYOUT, category_ids, coco_files
from util import preemption
from util.args import OneLineParser, non_negative_int, positive_int
from util.errors import UserInputError

REPO = os.path.dirname(os.path.abspath(__file__))


def get_launcher_parser():
    parser = OneLineParser("Submitit launcher for main.py", parents=[detr_main.get_args_parser()])
    parser.add_argument("--ngpus", default=8, type=positive_int, help="processes (GPUs) per node")
    parser.add_argument("--nodes", default=4, type=positive_int, help="number of nodes")
    parser.add_argument("--timeout", default=60, type=positive_int,
                        help="time limit of one job in minutes; the job requeues itself when it is reached")
    parser.add_argument("--job_dir", default="", type=str,
                        help="submitit's folder (logs, pickles); default <output_dir>/submitit, "
                             "or ./experiments/%%j without --output_dir (%%j = job id)")
    parser.add_argument("--cluster", default="slurm", choices=("slurm", "local"),
                        help="local: run the job on this machine with submitit's local executor (tests)")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--qos", default=None, help="SLURM quality of service")
    parser.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. volta32gb")
    parser.add_argument("--comment", default=None, help="SLURM job comment")
    parser.add_argument("--mem_gb", default=None, type=positive_int,
                        help="memory per node in GB (default 40 per process)")
    parser.add_argument("--cpus_per_task", default=10, type=positive_int, help="CPU cores per process")
    parser.add_argument("--job_name", default="dap-detr", help="SLURM job name")
    parser.add_argument("--max_requeues", default=30, type=non_negative_int,
                        help="give up after this many time-outs (preemptions do not count)")
    return parser


def continue_in_output_dir(options):
    """Resume from the output folder's checkpoint.pth when it exists (not from --finetune): a
    requeued, preempted or re-launched experiment continues where it stopped. `options` maps
    flag names to values: vars(args) or a config's flags. Returns the checkpoint path or None."""
    if not options.get("output_dir") or options.get("eval"):
        return None
    checkpoint = Path(options["output_dir"]) / "checkpoint.pth"
    if not checkpoint.is_file():
        return None
    options["resume"] = str(checkpoint)
    options["finetune"] = ""  # main.py refuses both; the checkpoint already holds the weights
    return str(checkpoint)


def timed_out(started, timeout_min, now=None):
    """Whether a job that started at `started` has used its time, by submitit's own rule: it
    has run for min(80 %, all but 10 minutes) of --timeout."""
    limit = timeout_min * 60
    return (now if now is not None else time.time()) - started >= min(0.8 * limit, limit - 600)


class Trainer:
    """The submitted callable: runs main.main(args) in every task of the job. On SIGUSR2 (time
    limit or preemption notice) training stops at a step boundary with a checkpoint, and submitit's
    handler calls checkpoint() on rank 0 and requeues what it returns."""

    def __init__(self, args):
        self.args = args
        self.output_dir = args.output_dir
        self.started = None  # when this job began
        self.advanced = False  # whether this job trained and saved at least one step

    def __call__(self):
        args = copy.deepcopy(self.args)  # main() edits args; a requeue must start from the original
        env = submitit.JobEnvironment()
        args.output_dir = args.output_dir.replace("%j", str(env.job_id))
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        self.output_dir = args.output_dir
        self.started = time.time()
        if env.num_tasks > 1:
            # env:// rendezvous on the first node; the port is derived from the job id, so a
            # requeued job (same id) uses the same one. Every task sees all GPUs of its node.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            args.dist_url = "env://"
        checkpoint = continue_in_output_dir(vars(args))
        if checkpoint:
            print(f"Continuing from {checkpoint}", flush=True)
        try:
            return detr_main.main(args)
        except UserInputError as e:
            # As main.py's command line: one line (on every rank: print() is silenced on ranks but
            # 0) and its exit status, where submitit would log the traceback.
            sys.stderr.write(f"error: {e.one_line()}\n")
            sys.exit(e.exit_status)
        except preemption.Preempted as stop:
            # It stopped after a step (or an epoch) and saved it: a requeued job goes on from there.
            sys.stderr.write(f"preempted: {stop}\n")  # print() is silenced on ranks but 0
            self.advanced = True
            # main.py held the signal back; submitit's handler, back in place, takes it now: on
            # rank 0 it calls checkpoint(), requeues the job and exits; elsewhere it returns.
            signal.raise_signal(preemption.SIGNAL)
            return None

    def checkpoint(self):
        # The requeued job continues from output_dir/checkpoint.pth (see __call__), mid-epoch
        # where this job stopped. One that reached its time limit without training a step (the
        # signal came before training began) would do the same at every requeue, never advancing:
        # it is not requeued. A preempted one is, whatever its progress.
        if self.started is not None and timed_out(self.started, self.args.timeout) and not self.advanced:
            print(f"error: the job reached its time limit (--timeout {self.args.timeout} minutes) before it "
                  f"trained a step, so a requeued job would never advance; resubmit with a larger --timeout: it "
                  f"continues from {self.output_dir}", flush=True)
            return None
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def check_submission(args):
    """Refuse now, with one line, what main.py would refuse at the job's start: its flag checks,
    the batch split over the job's processes, --coco_path and its annotations, the checkpoint
    files. On a copy of args, as the job will see them."""
    job_args = copy.deepcopy(args)
    continue_in_output_dir(vars(job_args))  # a restarted run resumes from its output folder instead of --finetune
    # A SLURM job on cuda asks for --ngpus GPUs per node (submit): its node has CUDA, unlike a
    # login node that may have none. A local job runs here and is checked as it is.
    job_has_cuda = job_args.cluster == "slurm" and str(job_args.device).startswith("cuda")
    detr_main.check_args(job_args, cuda_available=True if job_has_cuda else None)
    check_batch_split(job_args)
    check_checkpoint_files(job_args)
    check_dataset(job_args)


def check_batch_split(args):
    """main.set_batch_size's rule with the job's number of processes (--ngpus x --nodes)."""
    processes = args.ngpus * args.nodes
    if args.total_batch_size and args.total_batch_size % (processes * args.accum_iter):
        raise UserInputError(f"--total_batch_size {args.total_batch_size} is not divisible by the job's {processes} "
                             f"processes (--ngpus {args.ngpus} x --nodes {args.nodes}) x --accum_iter "
                             f"{args.accum_iter}; change one of them")


def check_checkpoint_files(args):
    """A local --finetune / --resume file exists (a URL is fetched by the job)."""
    for flag in ("finetune", "resume"):
        value = getattr(args, flag)
        if value and not value.startswith(("http://", "https://")) and not os.path.isfile(value):
            raise UserInputError(f"--{flag} {value}: file not found on this machine; the job reads it at this path, "
                                 "so give a file on a file system the compute nodes share (or a URL)")


def check_dataset(args):
    """--coco_path holds the COCO layout and the validation annotations name valid categories, as
    datasets.coco checks them in the job; read at the path the job uses."""
    if args.coco_path is not None:
        try:
            os.stat(args.coco_path)
        except OSError as e:
            raise UserInputError(f"--coco_path {args.coco_path} is not accessible from this machine ({e.strerror}); "
                                 "the job reads it at this path, so give a folder on a file system the compute "
                                 f"nodes share, holding {LAYOUT}") from None
    for image_set in ("train", "val"):
        coco_files(args, image_set)
    category_ids(args)


def job_folders(args):
    """Absolute (job_dir, output_dir): jobs may start in another working directory."""
    if args.output_dir:
        output_dir = os.path.abspath(args.output_dir)
        job_dir = os.path.abspath(args.job_dir) if args.job_dir else os.path.join(output_dir, "submitit")
    else:
        job_dir = os.path.abspath(args.job_dir or os.path.join("experiments", "%j"))
        output_dir = job_dir
    return job_dir, output_dir


def submit(args):
    """Submit Trainer(args) and return the submitit job."""
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserInputError("sbatch not found: SLURM is not available here; use --cluster local to run on "
                             "this machine (or torchrun, see scripts/reproduce.sh)")
    if args.cluster == "local" and args.nodes > 1:
        raise UserInputError("--cluster local runs on one node: use --nodes 1")
    check_submission(args)
    job_dir, args.output_dir = job_folders(args)
    if "%j" not in job_dir:
        Path(job_dir).mkdir(parents=True, exist_ok=True)

    # The job starts a fresh interpreter that imports this file and main.py by name.
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))

    on_gpu = str(args.device).startswith("cuda")
    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=args.ngpus,
        gpus_per_node=args.ngpus if on_gpu else None,  # None: no GPU request at all
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb if args.mem_gb is not None else 40 * args.ngpus,
        timeout_min=args.timeout,
        slurm_partition=args.partition,
        slurm_account=args.account,
        slurm_qos=args.qos,
        slurm_constraint=args.constraint,
        slurm_comment=args.comment,
    )
    return executor.submit(Trainer(args))


def main(argv=None):
    args = get_launcher_parser().parse_args(argv)
    try:
        job = submit(args)
    except UserInputError as e:
        sys.stderr.write(f"error: {e.one_line()}\n")
        sys.exit(2)
    print(f"Submitted job {job.job_id}; output in {args.output_dir}, logs in {job.paths.folder}")
    return job


if __name__ == "__main__":
    main()
