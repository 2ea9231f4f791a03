"""Live diagnostics: a training observer that holds the latest numbers for the HTTP app (docs/SPEC.md §6).

:class:`Diagnostics` is registered with the trainer (``on_start``, ``on_step``, ``on_eval``,
``on_end``) and read by the HTTP threads (:meth:`Diagnostics.snapshot`,
:meth:`Diagnostics.history`). Everything it holds is behind one lock; the training thread
only stores numbers it already has (train loss only at log steps, when the trainer reads it).
The attention probe runs on the training thread inside ``on_eval`` (:class:`ProbeRunner`), so
it never races the optimizer.

A snapshot reads the source's stream accounting, last batch statistics and cumulative
mask-ratio histogram (its percentiles are computed then, only when asked) and evaluates the
alarms, so ``starved`` shows even while the training thread is blocked waiting for data.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.meta import StreamMeta
from trainer.data.source import BatchSource
from trainer.data.stats import StreamStats
from trainer.diagnostics.alarms import Alarm, AlarmInputs, AlarmSettings, StreamWindow, WaitWindow, evaluate_alarms
from trainer.diagnostics.floor import context_free_floor, source_floors
from trainer.diagnostics.history import HISTORY_LENGTH, History
from trainer.diagnostics.mixture import source_numbers
from trainer.diagnostics.probe import ProbeResult, ProbeRunner
from trainer.diagnostics.schema import CumulativeNumbers, DiagnosticsResponse, LossNumbers, Throughput
from trainer.loop.live_samples import LiveSample
from trainer.loop.numbers import EvalNumbers, RunStart, RunSummary, StepNumbers

PROBE_HISTORY_KEYS = ("loss_attn", "loss_noattn", "loss_no_context", "loss_attn_sampled")


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite (JSON has neither)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Diagnostics:
    """Training observer holding the latest diagnostics; every public method is thread-safe.

    Args:
        consumer: the batch source (or None until ``on_start``): giving it here lets the
            stream numbers and the ``starved`` alarm show while the trainer still waits for data.
        probe_interval: run the attention probe at the first eval at least this many steps
            after the previous probe; None = at every eval, 0 = never.
        probe_rows / no_context_positions: size of the fixed probe subset (see trainer.diagnostics.probe).
        alarm_settings: thresholds of trainer.diagnostics.alarms.
        history_length: points kept per history series.
        clock: Unix time source (tests pass a fake one).
        stream_stats: where the ``stream`` numbers come from instead of ``consumer.stats()``
            (``trainer.loop.distributed.Ranks.stream_stats``: every rank's, on rank 0).
    """

    def __init__(
        self,
        consumer: BatchSource | None = None,
        probe_interval: int | None = None,
        probe_rows: int = 32,
        no_context_positions: int = 256,
        alarm_settings: AlarmSettings = AlarmSettings(),  # noqa: B008 - frozen, shared safely
        history_length: int = HISTORY_LENGTH,
        clock: Callable[[], float] = time.time,
        stream_stats: Callable[[], StreamStats] | None = None,
    ) -> None:
        self.alarm_settings = alarm_settings
        self.clock = clock
        self.prober = ProbeRunner(probe_interval, probe_rows, no_context_positions)
        self._stream_stats = stream_stats
        self._lock = threading.Lock()
        self._consumer = consumer
        self._created = clock()
        self._model = None
        self._val_batches: list[dict[str, Any]] = []
        self._status = "starting"
        self._step = 0
        self._meta: StreamMeta | None = None
        self._meta_summary = None
        self._loss = LossNumbers()
        self._throughput = Throughput()
        self._probe: ProbeResult | None = None
        self._alarms: dict[str, Alarm] = {}
        self._history = History(history_length)
        self._samples: list[LiveSample] = []
        self._window = StreamWindow(alarm_settings.window_seconds)
        self._waits = WaitWindow(alarm_settings.window_seconds)

    # ---- observer interface (training thread) -------------------------------------------

    def on_start(self, start: RunStart) -> None:
        """Attach to the run's consumer, model and val batches; pin the floors."""
        with self._lock:
            self._consumer = start.consumer
            self._model = start.model
            self._val_batches = start.val_batches
            self._status = "training"
            self._step = start.step
        self.set_meta(start.meta)

    def set_meta(self, meta: StreamMeta) -> None:
        floor_train, floor_val = context_free_floor(meta, "train"), context_free_floor(meta, "val")
        summary = meta.summary()
        floors_by_source = source_floors(meta, "val") if meta.sources else None
        with self._lock:
            self._meta, self._meta_summary = meta, summary
            self._loss.context_free_floor = floor_train
            self._loss.context_free_floor_val = floor_val
            self._loss.context_free_floor_val_by_source = floors_by_source
            if meta.sources and self._loss.val_by_source is None:
                self._loss.val_by_source = {}
                self._loss.train_by_source = {}
            self._loss.val_nll_bound_unavailable = meta.corruption.nll_bound_unavailable()

    def on_step(self, numbers: StepNumbers) -> None:
        """Every step's number is the step; log steps also carry the train loss (the mean since
        the last log) and the throughput figures."""
        with self._lock:
            self._step = numbers.step
            self._waits.add(self.clock(), numbers.step_ms / 1000, numbers.data_wait_ms / 1000)
        if not numbers.log:
            return
        throughput = Throughput(
            ms_per_step=finite_or_none(numbers.ms_per_step),
            tokens_per_s=finite_or_none(numbers.tokens_per_s),
            data_wait_fraction=finite_or_none(numbers.data_wait_fraction),
        )
        batch = self._batch_numbers()
        cumulative = self._cumulative_numbers()
        with self._lock:
            self._throughput = throughput
            self._loss.train = finite_or_none(numbers.train_loss)
            self._loss.train_step = numbers.step
            self._loss.train_by_stage = {str(k): float(v) for k, v in (numbers.train_loss_by_stage or {}).items()}
            if numbers.train_loss_by_source is not None:
                self._loss.train_by_source = {name: float(v) for name, v in numbers.train_loss_by_source.items()}
            point = {"step": numbers.step, "time": self.clock(), "loss": self._loss.train, **dataclasses.asdict(throughput)}
            if batch is not None:
                point.update({f"batch_{key}": value for key, value in dataclasses.asdict(batch.mask_ratio).items()})
            if cumulative.mask_ratio is not None:
                point.update({f"cumulative_{key}": getattr(cumulative.mask_ratio, key) for key in ("p10", "p50", "p90")})
            self._history.train.append(point)

    def on_eval(self, numbers: EvalNumbers) -> None:
        """After an eval; runs the attention probe when due."""
        point: dict[str, Any] = {"step": numbers.step, "time": self.clock(), "val": finite_or_none(numbers.val_loss)}
        with self._lock:
            self._step = numbers.step
            self._loss.val = point["val"]
            self._loss.val_step = numbers.step
            self._loss.val_by_stage = {str(k): float(v) for k, v in numbers.val_loss_by_stage.items()}
            if numbers.val_loss_by_source is not None:
                self._loss.val_by_source = {name: finite_or_none(v) for name, v in numbers.val_loss_by_source.items()}
                point.update({f"val_source.{name}": v for name, v in self._loss.val_by_source.items()})
            self._loss.val_nll_bound = finite_or_none(numbers.val_nll_bound)
            if self._loss.val_nll_bound is not None and self._meta is not None and self._meta.tokenizer == "char":
                self._loss.val_nll_bound_bits_per_char = self._loss.val_nll_bound / math.log(2)
            if numbers.samples:
                self._samples = list(numbers.samples)
            self._history.eval.append(point)  # now, with the val loss: the chart never lags the numbers by the probe
        if self._model is not None and self.prober.due(numbers.step):
            probe = self.run_probe(numbers.step)
            with self._lock:
                point.update({key: getattr(probe, key) for key in PROBE_HISTORY_KEYS})

    def on_end(self, summary: RunSummary) -> None:
        with self._lock:
            self._status = "stopped" if summary.stopped_by else "finished"
            self._step = int(summary.steps)

    def run_probe(self, step: int) -> ProbeResult:
        """Run the attention probe now (training thread) and publish it."""
        probe = self.prober.run(self._model, self._val_batches, step)
        with self._lock:
            self._probe = probe
        return probe

    # ---- reading (any thread) -----------------------------------------------------------

    def _batch_numbers(self):
        return getattr(self._consumer, "last_batch_stats", None)

    def _cumulative_numbers(self) -> CumulativeNumbers:
        histogram = getattr(self._consumer, "cumulative_mask_ratio", None)
        return CumulativeNumbers(mask_ratio=None if histogram is None else histogram.summary())

    def _seconds_without_data(self, stream: StreamStats | None, now: float) -> float | None:
        if stream is None or self._status in ("finished", "stopped"):
            return None
        waited = stream.seconds_since_last_message
        return now - self._created if waited is None else waited

    def _read_stream(self) -> StreamStats | None:
        consumer = self._consumer
        if self._stream_stats is not None:
            return self._stream_stats()
        return consumer.stats() if consumer is not None else None

    def snapshot(self) -> DiagnosticsResponse:
        """The full ``GET /diagnostics`` answer; also re-evaluates the alarms."""
        stream = self._read_stream()
        if self._meta is None and getattr(self._consumer, "meta", None) is not None:
            self.set_meta(self._consumer.meta)  # pinned while the trainer still prepares
        batch = self._batch_numbers()
        cumulative = self._cumulative_numbers()
        now = self.clock()
        with self._lock:
            sources = source_numbers(self._meta, stream.rows_by_source if stream else {}) if self._meta else {}
            accepted, rejected, by_reason = self._window.update(stream, now)
            data_wait, data_wait_seconds = self._waits.fraction(now)
            inputs = AlarmInputs(
                step=self._step,
                val_loss=self._loss.val,
                val_step=self._loss.val_step,
                floor=self._loss.context_free_floor_val,
                no_context_gap=self._probe.loss_no_context_minus_attn if self._probe is not None else None,
                probe_step=self._probe.step if self._probe is not None else None,
                seconds_without_data=self._seconds_without_data(stream, now),
                data_wait=data_wait,
                data_wait_seconds=data_wait_seconds,
                window_accepted=accepted,
                window_rejected=rejected,
                window_rejected_by_reason=by_reason,
                head_wait=stream.head_wait_s if stream is not None else 0.0,
                head_holder=stream.head_holder if stream is not None else None,
                exhausted_sources=tuple((name, mix.max_epochs) for name, mix in sources.items() if mix.exhausted),
            )
            self._alarms = evaluate_alarms(inputs, self.alarm_settings, self._alarms, now)
            if stream is not None:
                stream = dataclasses.replace(stream, data_wait_fraction=self._throughput.data_wait_fraction)
            return DiagnosticsResponse(
                status=self._status,
                time=now,
                step=self._step,
                meta=self._meta_summary,
                loss=self._loss_copy(),
                batch=batch,
                cumulative=cumulative,
                attention_probe=self._probe,
                stream=stream,
                throughput=self._throughput,
                alarms=list(self._alarms.values()),
                samples=list(self._samples),
                sources=sources or None,
            )

    def _loss_copy(self) -> LossNumbers:
        """A copy of the loss numbers with copies of their dicts."""
        loss = self._loss
        return dataclasses.replace(loss, val_by_stage=dict(loss.val_by_stage), train_by_stage=dict(loss.train_by_stage),
                                   val_by_source=None if loss.val_by_source is None else dict(loss.val_by_source),
                                   train_by_source=None if loss.train_by_source is None else dict(loss.train_by_source))

    def history(self) -> dict[str, Any]:
        """Column series for the page: ``train`` (per log step), ``eval`` (per eval) and the floors."""
        with self._lock:
            return {
                **self._history.columns(),
                "context_free_floor": self._loss.context_free_floor,
                "context_free_floor_val": self._loss.context_free_floor_val,
                "context_free_floor_val_by_source": self._loss.context_free_floor_val_by_source,
            }
