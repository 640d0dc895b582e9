"""The output folder of a run: one run at a time, never two runs mixed, no stale temporary files.

prepare_output_dir runs before anything is loaded or trained, on the main process: it takes the
folder's lock (held until the process ends), removes the temporary files an interrupted write
left behind, and refuses to train into a folder that holds another run unless --resume continues
it or --overwrite starts it over.
"""
import fcntl
import os
import shutil
from pathlib import Path

from util import interrupts
from util.errors import UserInputError

LOCK_FILE = ".lock"
# What a training run leaves in its folder; --overwrite removes them.
RUN_FILES = ("log.txt", "iterations.jsonl", "checkpoint.pth", "eval", "tb")
TEMPORARY_SUFFIX = ".tmp"


def write_atomically(path, write):
    """write(temporary_path) then rename it onto path: path holds the old content or the new,
    never a part (a kill leaves at most path.tmp, removed by the next run's prepare_output_dir)."""
    path = Path(path)
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    with interrupts.held():
        write(tmp)
        tmp.replace(path)


def lock_output_dir(folder):
    """Hold an exclusive lock on folder/.lock for the life of this process; refuses if another
    process holds it. Returns the open lock file (keep a reference to keep the lock)."""
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserInputError(f"another run is writing to --output_dir {folder} (it holds {folder / LOCK_FILE}); "
                             "wait for it to end or choose another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def remove_temporary_files(folder):
    """Files named *.tmp that an interrupted atomic write left behind (never a finished file)."""
    removed = []
    for path in folder.rglob(f"*{TEMPORARY_SUFFIX}"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def holds_a_run(folder):
    return (folder / "log.txt").exists() or any(folder.glob("checkpoint*.pth"))


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
    if not args.eval and not args.resume and holds_a_run(folder):
        if not args.overwrite:
            lock.close()
            raise UserInputError(f"--output_dir {folder} already holds a run (log.txt or checkpoints): continue it "
                                 f"with --resume {folder / 'checkpoint.pth'}, or start it over with --overwrite")
        for name in RUN_FILES:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for path in folder.glob("checkpoint*.pth"):
            path.unlink()
        print(f"--overwrite: removed the earlier run's files from {folder}")
    return lock
