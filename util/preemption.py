"""SIGUSR2, which SLURM sends ahead of a preemption or of the time limit (submitit asks for it 90 s
before), stops a training run at the next optimisation-step boundary: the run saves a mid-epoch
checkpoint, from which --resume continues the epoch exactly, and exits with one line
(main.train; docs/RELIABILITY.md).

The handler only records the request, so nothing stops in the middle of a step or of a write.
The training step carries the request in the reduction of its logged values (engine.train_step):
every process of a DDP run reads the same sum at the same step, and all stop after it, without a
collective operation of their own. A request that arrives after an epoch's last step (during the
evaluation) is agreed on once the epoch's checkpoint is written (`requested_anywhere`).
"""
import contextlib
import os
import signal

import torch
import torch.distributed as dist

import util.misc as utils

SIGNAL = signal.SIGUSR2
# As a shell reports a process that the signal ended (140 on Linux).
EXIT_STATUS = 128 + SIGNAL

_main_pid = None
_requested = False


class Preempted(Exception):
    """The run stopped on SIGUSR2 once its checkpoint was written; the message says where it
    stopped and how to continue."""

    exit_status = EXIT_STATUS


@contextlib.contextmanager
def recorded():
    """While the block runs, SIGUSR2 is recorded in this process, not acted on; afterwards the
    handler it had (submitit's, or the default) is back. DataLoader workers forked meanwhile leave
    the signal to the main process."""
    global _main_pid, _requested
    _main_pid, _requested = os.getpid(), False
    previous = signal.signal(SIGNAL, _record)
    try:
        yield
    finally:
        signal.signal(SIGNAL, previous)


def _record(signum, frame):
    global _requested
    if os.getpid() == _main_pid:
        _requested = True


def requested():
    """Whether this process got SIGUSR2."""
    return _requested


def requested_anywhere():
    """Whether any process got SIGUSR2: one all-reduce, so every process gets the same answer."""
    if not utils.is_dist_avail_and_initialized():
        return _requested
    flag = torch.tensor([float(_requested)], device=utils.collective_device())
    dist.all_reduce(flag)
    return flag.item() > 0
