"""The trainer's log: one format, and repeated warnings rate-limited so that a flood of failures
(a peer exhausting descriptors makes asyncio log every failed accept) cannot fill the disk.

:class:`RepeatLimit` lets through the first :attr:`burst` warnings (and errors) of each
(logger, message template) per :attr:`window_s` seconds, then drops the rest of that window and
says once how many it dropped when the next window opens. INFO records always pass: they are
the run's own record (a step line every ``--log-interval`` steps, the val loss at every eval,
start-up and stream events), each bounded by what it reports, and a log that drops them hides
the run's progress. A warning logged with ``extra=LIMITED_AT_SOURCE`` passes too: its caller
bounds it already (the consumer logs the 1st, 2nd, 4th... rejection of each reason from each
producer, so every offender is named once).
"""

from __future__ import annotations

import logging
import sys
import time

LIMITED_AT_SOURCE = {"limited_at_source": True}


class RepeatLimit(logging.Filter):
    def __init__(self, burst: int = 5, window_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "limited_at_source", False):
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            dropped = window[2] if window is not None else 0
            if len(self._windows) > 4096:  # bounded: forget old keys
                self._windows.clear()
            self._windows[key] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this in the last {self.window_s:.0f} s were not logged]"
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False


class OneLineAcceptErrors(logging.Filter):
    """asyncio logs every failed ``accept()`` of the diagnostics server (a peer using up the
    descriptors) with a traceback; one line with the error says as much."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio" and record.exc_info and "accept()" in str(record.msg):
            error = record.exc_info[1]
            record.msg, record.args, record.exc_info, record.exc_text = f"{record.msg}: {error}", (), None, None
        return True


def configure(prefix: str = "") -> None:
    """INFO to stdout with a timestamp, ``prefix`` before the logger name, repeated warnings limited."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(name)s %(message)s"))
    handler.addFilter(OneLineAcceptErrors())
    handler.addFilter(RepeatLimit())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
