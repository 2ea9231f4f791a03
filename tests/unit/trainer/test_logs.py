"""The trainer's log (trainer.runtime.logs): repeated warnings are limited, the run's own lines never."""

from __future__ import annotations

import io
import logging

import pytest

from trainer.loop.numbers import EvalNumbers, StepNumbers
from trainer.loop.observers import ConsoleLog
from trainer.runtime import logs


@pytest.fixture
def configured_log(monkeypatch):
    """What trainer.runtime.logs.configure() writes to stdout; the root logger's handlers restored afterwards."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    root = logging.getLogger()
    previous = (root.handlers[:], root.level)
    logs.configure()
    yield out
    root.handlers[:], root.level = previous[0], previous[1]


def test_every_step_and_eval_line_is_logged_however_fast_they_come(configured_log):
    console = ConsoleLog()
    console.on_eval(EvalNumbers(step=0, val_loss=4.0, val_loss_by_stage={}, val_supervised=10, eval_ms=1.0,
                                before_training=True))
    for step in range(10, 310, 10):  # 30 log steps within a second: the default 2,000-step run logs 200
        val_loss = 3.0 if step % 100 == 0 else None
        console.on_step(StepNumbers(step=step, log=True, lr=1e-3, step_ms=1.0, data_wait_ms=0.0, tokens=4096,
                                    train_loss=3.5, ms_per_step=1.0, tokens_per_s=4096.0, data_wait_fraction=0.0,
                                    val_loss=val_loss))
    out = configured_log.getvalue()
    steps = [line for line in out.splitlines() if " trainer step " in line]
    assert len(steps) == 31, out
    assert [line for line in steps if "| val 3.0000" in line] == [s for s in steps if "step 100 " in s or "step 200 " in s
                                                                    or "step 300 " in s]
    assert "not logged" not in out


def test_repeated_warnings_are_still_limited(configured_log):
    warn = logging.getLogger("trainer")
    for index in range(50):
        warn.warning("checkpoint skipped: %d", index)
    out = configured_log.getvalue()
    assert out.count("checkpoint skipped") == 5
