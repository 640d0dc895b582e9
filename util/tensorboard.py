"""TensorBoard logs of a training run, in <output_dir>/tb/ (`tensorboard --logdir outputs`), written
by rank 0: at every optimisation step the values of iterations.jsonl (losses with their auxiliary
copies, learning rates, DAP's value and mean precision, gradient norm) and the step's time; at
every epoch's end the numbers of its log.txt line (the 12 COCO numbers by name, the evaluation
losses) and DAP's precision tables as heat maps.

The x axis is the global step, the optimisation steps done since the run began (counted, and
kept in the checkpoints, so a run resumed with another batch layout goes on from the right
step); an epoch's values sit at its last step. A resumed run opens the writer with purge_step at
its first step: TensorBoard drops whatever an earlier process wrote from there on (the steps it
redoes), so the curves go on without a duplicated step.
"""
import contextlib
import importlib

from util.logs import COCO_STATS
from util.misc import is_main_process
from util.plot_utils import precision_table_figure

NOT_LOGGED = ("epoch", "n_parameters")


def installed():
    """Whether torch's TensorBoard writer can be imported (it needs the tensorboard package)."""
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        return False
    return True


class TrainingBoard:
    def __init__(self, log_dir, first_step):
        from torch.utils.tensorboard import SummaryWriter
        self.next_step = first_step  # the global step of the next optimisation step
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step)

    def log_step(self, values):
        """The next optimisation step's values, {name: number}, as scalars 'step/<name>'."""
        for name, value in values.items():
            self.writer.add_scalar(f"step/{name}", value, self.next_step)
        self.next_step += 1

    def log_epoch(self, epoch, log_stats):
        """An epoch's log.txt line: its numbers as 'epoch/<name>', the COCO numbers as
        'coco/<AP...>', the precision tables ('..._table') as heat-map images 'dap/<name>'.
        Written to disk now: the epoch's checkpoint follows."""
        global_step = self.next_step - 1  # the epoch's last step
        for name, value in log_stats.items():
            if name in NOT_LOGGED:
                continue
            if name == "test_coco_eval_bbox":
                for metric, number in zip(COCO_STATS, value):
                    self.writer.add_scalar(f"coco/{metric}", number, global_step)
            elif name.endswith("_table"):
                self.writer.add_figure(f"dap/{name}", precision_table_figure(value, f"{name}, epoch {epoch}"),
                                       global_step)
            else:
                self.writer.add_scalar(f"epoch/{name}", value, global_step)
        self.flush()

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


@contextlib.contextmanager
def training_board(args, output_dir, first_step):
    """The run's TrainingBoard (closed at the end), or None: on ranks other than 0, without
    --output_dir, with --no_tensorboard, or without the tensorboard package (said once; an
    explicit --tensorboard without it is refused by main.check_args)."""
    if args.tensorboard is False or output_dir is None or not is_main_process():
        yield None
        return
    if not installed():
        print("TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard)")
        yield None
        return
    board = TrainingBoard(output_dir / "tb", first_step)
    try:
        yield board
    finally:
        board.close()
