"""File descriptors kept in reserve, so that the trainer's own writes (checkpoints, the
recording, metrics) survive a peer that uses up the others (docs/SECURITY.md).

At start-up :func:`raise_open_file_limit` lifts the soft limit to the hard one, and
:data:`RESERVE` holds a few descriptors open. A write that fails with EMFILE/ENFILE releases
them (:meth:`FdReserve.released`) and is retried for up to :data:`PATIENCE_S` seconds (a
flood's connections go: the ZeroMQ port drops peers that do not finish their handshake within
2 s, the HTTP server holds at most 64), and the reserve is taken again afterwards. A caller
for whom the write can wait (a checkpoint: the next evaluation writes one) may then skip it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger("trainer")
T = TypeVar("T")

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
PATIENCE_S = 10.0  # how long a write out of descriptors keeps trying
RETRY_EVERY_S = 0.1


def raise_open_file_limit() -> int:
    """Lifts this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class FdReserve:
    """``count`` descriptors of /dev/null held open, to be given back when they are needed."""

    def __init__(self, count: int = 16) -> None:
        self.count = count
        self._fds: list[int] = []
        self.take()

    def take(self) -> None:
        """Holds descriptors until there are ``count`` (as many as the process can get)."""
        while len(self._fds) < self.count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """The reserve given back for the duration of the block, then taken again."""
        self.release()
        try:
            yield
        finally:
            self.take()


RESERVE = FdReserve()


def out_of_descriptors(error: BaseException) -> bool:
    """The error (or its cause) is EMFILE or ENFILE."""
    return any(isinstance(e, OSError) and e.errno in OUT_OF_DESCRIPTORS for e in (error, error.__cause__))


def retry_out_of_descriptors(write: Callable[[], T], what: str, patience_s: float = PATIENCE_S) -> T:
    """``write()``; if it fails for lack of descriptors, again with the reserve released, every
    :data:`RETRY_EVERY_S` for up to ``patience_s`` seconds (then its error is raised)."""
    try:
        return write()
    except OSError as error:
        if not out_of_descriptors(error):
            raise
    log.warning("%s: out of file descriptors; retrying with the reserved ones for up to %.0f s", what, patience_s)
    deadline = time.monotonic() + patience_s
    with RESERVE.released():
        while True:
            try:
                return write()
            except OSError as error:
                if not out_of_descriptors(error) or time.monotonic() >= deadline:
                    raise
            time.sleep(RETRY_EVERY_S)
