"""Diagnostics for a training loop that is not Linepack's (``Stream.serve_diagnostics``, docs/API.md).

:class:`Reporter` serves the same ``/diagnostics``, ``/metrics``, ``/history`` and page as
``python -m trainer`` for a stream that your own loop consumes: the stream accounting, the batch
statistics, the data wait and the alarms that need only the stream come from the consumer; your
loop adds its losses with one call, :meth:`Reporter.report`, and with them the context-free floor
and ``context_blind`` judge your model. There is no attention probe (it runs Linepack's model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from shared.meta import StreamMeta
from trainer.data.source import BatchSource
from trainer.diagnostics.alarms import AlarmSettings
from trainer.diagnostics.http import create_app
from trainer.diagnostics.server import serve_in_thread
from trainer.diagnostics.state import Diagnostics
from trainer.loop.numbers import EvalNumbers, RunStart, RunSummary, StepNumbers

# () -> (tokens handed out so far, seconds spent waiting for them): the stream's own counters.
Meter = Callable[[], "tuple[int, float]"]


class Reporter:
    """Serves the diagnostics of ``consumer``'s stream on ``host:port`` (0: a free port, see
    :attr:`port`) and takes your loop's losses; a context manager (:meth:`close` on exit).

    Args:
        consumer: the stream's consumer; meter: its token and wait counters; meta: its meta.
        warmup_steps: steps before ``context_blind`` may fire.
    """

    def __init__(self, consumer: BatchSource, meter: Meter, meta: StreamMeta, port: int = 8000, host: str = "127.0.0.1",
                 warmup_steps: int = 500) -> None:
        self.diagnostics = Diagnostics(consumer, probe_interval=0, alarm_settings=AlarmSettings(warmup_steps=warmup_steps))
        self.diagnostics.on_start(RunStart(meta=meta, step=0, consumer=consumer))  # no model: no probe
        self._meter = meter
        self._server = serve_in_thread(create_app(self.diagnostics), host, port)
        self._started = self._last_time = time.perf_counter()
        self._last_step, (self._last_tokens, self._last_wait) = 0, meter()
        self._losses: tuple[float | None, float | None] = (None, None)

    @property
    def port(self) -> int:
        return self._server.port

    def report(self, step: int, loss: float | None = None, val_loss: float | None = None, lr: float | None = None) -> None:
        """Your loop's numbers at optimizer step ``step`` (steps done): ``loss`` the train loss
        (nats per supervised token; mean since the last report or this step's), ``val_loss`` on
        the stream's fixed val set. Throughput and data wait are measured since the last report.
        Call it every step or every few steps; either number may be left out."""
        now, (tokens, wait) = time.perf_counter(), self._meter()
        elapsed = max(now - self._last_time, 1e-9)
        steps = max(step - self._last_step, 1)
        self.diagnostics.on_step(StepNumbers(
            step=step, log=loss is not None, lr=math.nan if lr is None else lr, step_ms=1000 * elapsed,
            data_wait_ms=1000 * (wait - self._last_wait), tokens=tokens - self._last_tokens, train_loss=loss,
            ms_per_step=1000 * elapsed / steps, tokens_per_s=(tokens - self._last_tokens) / elapsed,
            data_wait_fraction=(wait - self._last_wait) / elapsed))
        if val_loss is not None:
            self.diagnostics.on_eval(EvalNumbers(step=step, val_loss=val_loss, val_loss_by_stage={}, val_supervised=0,
                                                 eval_ms=0.0, before_training=False))
        self._last_time, self._last_step, self._last_tokens, self._last_wait = now, step, tokens, wait
        self._losses = (loss if loss is not None else self._losses[0], val_loss if val_loss is not None else self._losses[1])

    def close(self, stopped: bool = False) -> None:
        """Marks the run ``finished`` (``stopped``: ``stopped``) and stops the server."""
        self.diagnostics.on_end(RunSummary(steps=self._last_step, train_loss=self._losses[0], val_loss=self._losses[1],
                                           val_loss_by_stage=None, wall_s=time.perf_counter() - self._started, stream=None,
                                           stopped_by="stopped" if stopped else None))
        self._server.stop()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(stopped=exc[0] is not None)
