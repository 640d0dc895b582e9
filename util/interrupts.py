"""Ctrl-C (SIGINT) and SIGTERM end a run as a KeyboardInterrupt: never inside a write that has
begun (`held`), and never lost. The request is remembered and raised again at the next check
point (`check`, between training steps and evaluation batches), for the case where a library
swallowed the first KeyboardInterrupt (one raised inside a destructor is only printed).

Python runs signal handlers in the main thread whichever thread the signal reaches, so this works
while other threads (the evaluation backend's, the BLAS pools) exist; a signal mask would not, as
it holds signals for the calling thread only.
"""
import contextlib
import os
import signal

_main_pid = None
_requested = False
_holding = 0


def install():
    """Handle SIGINT and SIGTERM in this process (the CLI's: main.run_cli). DataLoader workers are
    forked with the handler; in a worker each signal keeps its default meaning."""
    global _main_pid, _requested
    _main_pid, _requested = os.getpid(), False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def _interrupt(signum, frame):
    global _requested
    if os.getpid() != _main_pid:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _requested = True
    if not _holding:
        raise KeyboardInterrupt


def check():
    """Raise KeyboardInterrupt if an interrupt arrived (outside a held block)."""
    if _requested and not _holding:
        raise KeyboardInterrupt


@contextlib.contextmanager
def held():
    """An interrupt that arrives in the block is raised when the block ends: a write that has
    begun is finished. SIGKILL cannot wait; the temporary file then stays behind, unused."""
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
    check()
