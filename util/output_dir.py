"""The output folder of a run: one run at a time, never two runs mixed, no stale temporary files.

prepare_output_dir runs before anything is loaded or trained, on the main process: it takes the
folder's lock (held until the process ends), removes the temporary files an interrupted write
left behind, and refuses to train into a folder that holds another run unless --resume continues
it (a checkpoint of that folder) or --overwrite starts it over. What a run stopped before its
first checkpoint left (nothing a --resume could continue) is removed, so that the same command
run again, as a requeued job does, starts the run over instead of being refused or appending to
the stopped run's logs.
"""
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from util import interrupts
from util.errors import UserInputError

LOCK_FILE = ".lock"
# What a training run leaves in its folder; --overwrite removes them.
RUN_FILES = ("log.txt", "iterations.jsonl", "eval", "tb")  # and checkpoint*.pth
TEMPORARY_SUFFIX = ".tmp"


def write_atomically(path, write):
    """write(temporary_path) then rename it onto path: path holds the old content or the new,
    never a part (a kill leaves at most path.tmp, removed by the next run's prepare_output_dir).
    The file and then the rename are flushed to the disk before returning, so that a machine that
    crashes right after cannot bring back an empty file in place of the old one. A write that
    fails removes its temporary file (a full disk stays full otherwise)."""
    path = Path(path)
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    with interrupts.held():
        try:
            write(tmp)
            _flush_to_disk(tmp)
            tmp.replace(path)
        except BaseException as err:
            full = _disk_is_full(err, path.parent)
            tmp.unlink(missing_ok=True)
            if full:
                raise UserInputError(f"no space left on the device of {path.parent} while writing {path.name} (the "
                                     "earlier version is intact); free some space and continue the run with "
                                     "--resume") from None
            raise
        _flush_to_disk(path.parent)


def _flush_to_disk(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_is_full(err, folder):
    """ENOSPC / EDQUOT, or a writer that hides them in another error (torch.save's zip writer
    raises RuntimeError) with the device out of space."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        return isinstance(err, Exception) and shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def exclusive_lock(path, refusal):
    """An exclusive lock on the file at path, held until the returned open file is closed (or the
    process ends); UserInputError(refusal) if another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserInputError(refusal) from None
    return handle


def lock_output_dir(folder):
    """Hold an exclusive lock on folder/.lock for the life of this process; refuses if another
    process holds it. Returns the open lock file (keep a reference to keep the lock)."""
    handle = exclusive_lock(folder / LOCK_FILE, f"another run is writing to --output_dir {folder} (it holds "
                                                f"{folder / LOCK_FILE}); wait for it to end or choose another "
                                                "--output_dir")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def remove_temporary_files(folder):
    """Files named *.tmp that an interrupted atomic write of a run left behind in the folder or
    its eval/ (never a finished file; not deeper: a folder below may be another run's, live)."""
    removed = []
    for path in [*folder.glob(f"*{TEMPORARY_SUFFIX}"), *(folder / "eval").glob(f"*{TEMPORARY_SUFFIX}")]:
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def logged_epochs(folder):
    """The epochs log.txt records (a line each, written before the epoch's checkpoint)."""
    try:
        lines = (folder / "log.txt").read_text().splitlines()
    except FileNotFoundError:
        return set()
    epochs = set()
    for line in lines:
        try:
            epochs.add(json.loads(line).get("epoch"))
        except (ValueError, AttributeError):
            epochs.add(None)  # not a line this code wrote: a run to keep
    return epochs


def holds_a_run(folder):
    """Whether the folder holds a run that --resume could continue or that has more than its
    first epoch logged: a checkpoint, or log.txt beyond epoch 0 (its checkpoints deleted)."""
    return any(folder.glob("checkpoint*.pth")) or bool(logged_epochs(folder) - {0})


def stopped_before_first_checkpoint(folder):
    """The files of a run stopped before its first checkpoint was written: its step log, its
    TensorBoard events, evaluation arrays, at most epoch 0's log line; nothing to resume."""
    return not holds_a_run(folder) and any((folder / name).exists() for name in RUN_FILES)


def remove_run_files(folder):
    # Checkpoints first: a kill during the removal leaves no checkpoint beside a cut log, which
    # a requeued job would otherwise --resume.
    for path in folder.glob("checkpoint*.pth"):
        path.unlink()
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def continues_this_folder(resume, folder):
    """--resume names a checkpoint in this folder (not a URL, not another run's)."""
    if not resume or "://" in resume:
        return False
    return Path(resume).resolve().parent == folder.resolve()


def prepare_output_dir(args):
    """Create and lock --output_dir and check that this run may write there (see the module
    docstring). Returns the lock (None without --output_dir)."""
    if not args.output_dir:
        return None
    folder = Path(args.output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"--output_dir {folder} cannot be created: {err.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"--output_dir {folder} is not writable")
    lock = lock_output_dir(folder)
    for path in remove_temporary_files(folder):
        print(f"Removed {path}, left by an interrupted write")
    if args.eval or continues_this_folder(args.resume, folder):
        return lock
    if holds_a_run(folder):
        if not args.overwrite:
            lock.close()
            start = (f"--resume {args.resume} starts from another run's checkpoint" if args.resume
                     else "continue it with --resume " + str(folder / "checkpoint.pth"))
            raise UserInputError(f"--output_dir {folder} already holds a run (log.txt or checkpoints): {start}; "
                                 "start it over with --overwrite, or choose another --output_dir")
        remove_run_files(folder)
        print(f"--overwrite: removed the earlier run's files from {folder}")
    elif stopped_before_first_checkpoint(folder):
        remove_run_files(folder)
        print(f"Removed from {folder} the logs of a run stopped before its first checkpoint (nothing to resume)")
    return lock
