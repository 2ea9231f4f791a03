"""Stopping the training loop on SIGINT / SIGTERM between optimizer steps, with a checkpoint.

:class:`StepBoundary` holds a stop signal that arrives during a training step until the step is
done, so the checkpoint written on the way out (``Trainer.run``) holds whole steps: the model,
the optimizer and the step count agree. :func:`deadline` bounds that checkpoint in time: it
must land before a launcher's SIGKILL (``trainer.processes.STOP_TIMEOUT_S``, 5 s after its
SIGTERM); a write cut short leaves the previous checkpoint as it was (the write is atomic).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_CHECKPOINT_S = 3.0  # seconds a checkpoint on the way out may take; under the launchers' 5 s before SIGKILL


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StepBoundary:
    """While :meth:`installed` (in the main thread), SIGINT and SIGTERM act at once outside
    :meth:`step` and are held until its end inside it; they then do what their handlers did
    before (KeyboardInterrupt; ``trainer.__main__`` makes SIGTERM a SystemExit). A signal whose
    handler was not a Python function (the default, ignored) is left alone."""

    def __init__(self) -> None:
        self._inside = False
        self._held: list[int] = []
        self._previous: dict[int, Callable[[int, Any], Any]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                previous = signal.getsignal(signum)
                if callable(previous):
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        try:
            yield
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._inside:
            self._held.append(signum)
            return
        self._previous[signum](signum, frame)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step: a stop signal that arrives meanwhile acts when it is done."""
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
        if self._held:
            signum = self._held[0]
            self._held.clear()
            self._previous[signum](signum, None)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raises TimeoutError in the block when it runs longer than ``seconds`` (a SIGALRM timer;
    in the main thread only, elsewhere the block is not bounded)."""
    if not _in_main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
