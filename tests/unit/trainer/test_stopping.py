"""trainer.loop.stopping: a stop signal during a training step acts when the step is done; the
checkpoint on the way out is bounded in time."""

from __future__ import annotations

import os
import signal
import time

import pytest

from trainer.loop.stopping import StepBoundary, deadline


def test_a_signal_inside_a_step_acts_when_the_step_is_done():
    boundary = StepBoundary()
    done = []
    with boundary.installed(), pytest.raises(KeyboardInterrupt):
        with boundary.step():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now: it held the signal
            done.append("the whole step")
    assert done == ["the whole step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_signal_outside_a_step_acts_at_once():
    boundary = StepBoundary()
    with boundary.installed(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        pytest.fail("the signal was held outside a step")


def test_a_deadline_cuts_the_block_short():
    started = time.monotonic()
    with pytest.raises(TimeoutError), deadline(0.2):
        time.sleep(5)
    assert time.monotonic() - started < 1
    with deadline(1):
        pass
    time.sleep(1.2)  # the timer is off: no SIGALRM after the block
