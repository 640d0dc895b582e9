"""util/interrupts.py: an interrupt waits for the end of a held block (a write), whichever thread
the signal reaches, and one that a library swallowed is raised again at the next check."""
import os
import signal
import threading
import time

import pytest
import torch

from util import interrupts


@pytest.fixture
def installed():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    interrupts._requested = False


def other_threads():
    """Threads besides the main one, as a run has them (torch's pool, a Python thread)."""
    torch.set_num_threads(2)
    torch.randn(512, 512) @ torch.randn(512, 512)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    return stop


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_waits_for_the_held_block_to_end(installed, signum):
    stop = other_threads()
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held():
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # the handler has run by now (in the main thread)
            assert interrupts._requested
            finished.append(True)
    stop.set()
    assert finished == [True]


def test_outside_a_held_block_the_interrupt_is_immediate(installed):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_a_swallowed_interrupt_is_raised_again_at_the_next_check(installed):
    interrupts.check()  # nothing arrived: nothing raised
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    except KeyboardInterrupt:
        pass  # what a destructor or a careless library does
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
