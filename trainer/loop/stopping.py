"""Stopping the training loop on SIGINT / SIGTERM where it is safe, with a checkpoint.

:class:`StopSignals` notes a stop signal instead of letting it interrupt the loop wherever it
lands (inside an optimizer update, or inside the consumer while it hands over a batch);
``Trainer.run`` acts on it at safe points only: before each step, and every
:data:`STOP_POLL_S` seconds while it waits for data (:func:`next_train_batch`). So the checkpoint written on the way out
holds whole steps: the model, the optimizer, the step count and the data consumed agree.
:func:`checkpoint_on_stop` writes it, :func:`deadline` bounding it in time: it must land before a launcher's SIGKILL
(``trainer.runtime.processes.STOP_TIMEOUT_S``, 5 s after its SIGTERM); a write cut short leaves the
previous checkpoint as it was (the write is atomic).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from trainer.data.source import Batch, BatchSource
from trainer.loop.checkpoint import CheckpointWriteError

log = logging.getLogger("trainer")

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


def next_train_batch(source: BatchSource, stop: StopSignals, timeout: float | None, rank: int, step: int) -> Batch:
    """``source``'s next train batch; TimeoutError after ``timeout`` seconds (``--data-timeout``;
    None: forever) without one. Waits in pieces of STOP_POLL_S seconds, acting on a stop signal
    (``stop.check()``) between them."""
    deadline_at = None if timeout is None else time.monotonic() + timeout
    while True:
        stop.check()
        wait = STOP_POLL_S if deadline_at is None else max(0.0, min(STOP_POLL_S, deadline_at - time.monotonic()))
        try:
            return source.next_batch("train", timeout=wait)
        except TimeoutError as error:
            if deadline_at is not None and time.monotonic() >= deadline_at:
                raise TimeoutError(
                    f"rank {rank}: no train batch for {timeout:.0f} s (--data-timeout) "
                    f"on {getattr(source, 'endpoint', 'the stream')}: its producers stopped or never connected; "
                    f"stopping at step {step}"
                ) from error


def checkpoint_on_stop(write: Callable[[], None], stopped_by: str, step: int, saved_step: int, path: str) -> None:
    """On the way out after a signal: ``write()`` a checkpoint of ``step`` to ``path``, bounded by
    STOP_CHECKPOINT_S seconds; a second signal abandons it (then the checkpoint of ``saved_step``
    stands, whole)."""
    started = time.perf_counter()
    try:
        with deadline(STOP_CHECKPOINT_S):
            write()
    except (CheckpointWriteError, TimeoutError, KeyboardInterrupt, SystemExit) as error:
        log.warning("%s at step %d: its checkpoint was not written (%s: %s); the one of step %d stands", stopped_by,
                    step, type(error).__name__, error, saved_step)
        return
    log.info("%s at step %d: checkpoint written to %s in %.2f s", stopped_by, step, path, time.perf_counter() - started)
