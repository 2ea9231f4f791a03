"""Stopping the training loop on SIGINT / SIGTERM where it is safe, with a checkpoint.

:class:`StopSignals` notes a stop signal instead of letting it interrupt the loop wherever it
lands (inside an optimizer update, or inside the consumer while it hands over a batch);
``Trainer.run`` acts on it at safe points only: before each step, and every
:data:`STOP_POLL_S` seconds while it waits for data. So the checkpoint written on the way out
holds whole steps: the model, the optimizer, the step count and the data consumed agree.
:func:`deadline` bounds that checkpoint in time: it must land before a launcher's SIGKILL
(``trainer.processes.STOP_TIMEOUT_S``, 5 s after its SIGTERM); a write cut short leaves the
previous checkpoint as it was (the write is atomic).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_POLL_S = 0.5  # seconds between looks at a noted stop signal while waiting for data
STOP_CHECKPOINT_S = 3.0  # seconds a checkpoint on the way out may take; under the launchers' 5 s before SIGKILL


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopSignals:
    """While :meth:`installed` (in the main thread), SIGINT and SIGTERM are noted, not acted on;
    :meth:`check` then does what their handlers did before (KeyboardInterrupt; ``trainer.__main__``
    makes SIGTERM a SystemExit). A signal whose handler was not a Python function (the default,
    ignored) is left alone; outside :meth:`installed` every signal acts as before."""

    def __init__(self) -> None:
        self._noted: list[int] = []
        self._previous: dict[int, Callable[[int, Any], Any]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if _in_main_thread():
            for signum in STOP_SIGNALS:
                previous = signal.getsignal(signum)
                if callable(previous):
                    self._previous[signum] = previous
                    signal.signal(signum, self._note)
        try:
            yield
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)

    def _note(self, signum: int, _frame: Any) -> None:
        self._noted.append(signum)

    def check(self) -> None:
        """Acts on the first stop signal noted, if any (its previous handler raises)."""
        if self._noted:
            signum = self._noted[0]
            self._noted.clear()
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
