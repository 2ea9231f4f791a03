"""trainer.loop.stopping: a stop signal is noted where it lands and acts where the loop checks;
the checkpoint on the way out is bounded in time. (A real trainer process: integration/test_faults.py.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

from trainer.loop.stopping import StopSignals, deadline


def test_a_stop_signal_acts_only_where_it_is_checked():
    stop = StopSignals()
    done = []
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler has run by now: it noted the signal
        done.append("an optimizer update, whole")
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        stop.check()  # acted on once
    assert done == ["an optimizer update, whole"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_signal_after_the_loop_acts_at_once():
    with StopSignals().installed():
        pass
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_a_deadline_cuts_the_block_short():
    started = time.monotonic()
    with pytest.raises(TimeoutError), deadline(0.2):
        time.sleep(5)
    assert time.monotonic() - started < 1
    with deadline(1):
        pass
    time.sleep(1.2)  # the timer is off: no SIGALRM after the block
