"""Live diagnostics: a training observer that holds the latest numbers for the HTTP app (SPEC §6).

:class:`Diagnostics` is registered with the trainer (``on_start``, ``on_step``, ``on_eval``,
``on_end``) and read by the HTTP threads (:meth:`Diagnostics.snapshot`,
:meth:`Diagnostics.history`). Everything it holds is behind one lock; the training thread
only stores numbers it already has (train loss only at log steps, when the trainer reads it).
The attention probe runs on the training thread inside ``on_eval`` (every ``probe_interval``
steps, by default at every eval), so it never races the optimizer.

A snapshot reads the consumer's stream accounting, last batch statistics and cumulative
mask-ratio histogram (its percentiles are computed then, only when asked) and evaluates the
alarms, so ``starved`` shows even while the training thread is blocked waiting for data.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable

from pydantic import BaseModel

from shared.meta import StreamMeta
from trainer.alarms import Alarm, AlarmInputs, AlarmSettings, evaluate_alarms
from trainer.floor import context_free_floor
from trainer.probe import ProbeSet, attention_probe, build_probe_set

HISTORY_LENGTH = 2000  # points per series kept for the page


class MetaSummary(BaseModel):
    """The pinned stream meta without the per-character counts (``content_tokens`` is their sum)."""

    block_size: int
    rows_per_message: int
    vocab_size: int
    base_size: int
    mask_id: int
    sep_id: int
    pad_id: int
    ignore_index: int
    packing: str
    sampling: str
    corruption: dict[str, Any]
    seed: int
    corpus_fingerprint: str
    val_messages: int
    content_tokens: int
    digest: str


class LossNumbers(BaseModel):
    """Cross-entropy in nats over supervised positions; floors for the train and val stage mixes."""

    train: float | None = None
    train_step: int | None = None
    val: float | None = None
    val_step: int | None = None
    context_free_floor: float | None = None
    context_free_floor_val: float | None = None
    val_by_stage: dict[str, float] = {}
    train_by_stage: dict[str, float] = {}  # over the last log interval, by stage id; empty without stages


class ValidLen(BaseModel):
    mean: float
    min: int
    max: int
    p50: float


class Corruption(BaseModel):
    pct_mask: float
    pct_random: float
    pct_unchanged: float


class Percentiles(BaseModel):
    p10: float | None
    p50: float | None
    p90: float | None


class CumulativePercentiles(Percentiles):
    count: int


class BatchNumbers(BaseModel):
    """Statistics of the last batch handed to the training loop (``trainer.batch_stats``)."""

    rows: int
    valid_len: ValidLen
    supervised_per_token: float
    supervised_per_position: float
    corruption: Corruption
    mask_ratio: Percentiles


class CumulativeNumbers(BaseModel):
    mask_ratio: CumulativePercentiles | None = None


class ProbeNumbers(BaseModel):
    """``trainer.probe.attention_probe`` at ``step``; ``seconds`` is how long it took."""

    step: int
    seconds: float
    loss_attn: float
    loss_noattn: float
    loss_noattn_minus_attn: float
    loss_no_context: float
    loss_attn_sampled: float
    loss_no_context_minus_attn: float
    rows: int
    positions: int
    no_context_positions: int


class Throughput(BaseModel):
    ms_per_step: float | None = None
    tokens_per_s: float | None = None
    data_wait_fraction: float | None = None


class ProducerRow(BaseModel):
    """One producer's message accounting (``trainer.consumer.ProducerTable``)."""

    messages: int
    train: int
    val: int
    first_seq: int
    last_seq: int
    gaps: int
    duplicates: int
    out_of_order: int
    consumed: int = 0  # train messages whose rows went into handed-out batches
    dropped: int = 0  # train messages read past while the trainer waited for the val set
    seconds_since_last: float


class StreamCounts(BaseModel):
    """``DatasetConsumer.stats()``: one consumer's stream accounting, or their totals."""

    received: int
    accepted: int
    rejected: dict[str, int]  # by reason
    rejected_by_producer: dict[str, dict[str, int]] = {}  # reason counts of rejects whose header named a producer
    rejected_total: int
    consumed_messages: int
    consumed_batches: int
    dropped_train: int
    gaps: int
    duplicates: int
    out_of_order: int
    producers: dict[str, ProducerRow]
    starved: bool
    seconds_since_last_message: float | None
    queue_depth: int
    val_messages_seen: int
    val_messages_total: int | None
    meta_digest: str | None


class RankStream(StreamCounts):
    """One data-parallel rank's consumer (``trainer.distributed``), as of step ``as_of_step``
    (None: live, read at this request)."""

    rank: int
    endpoint: str
    as_of_step: int | None


class StreamNumbers(StreamCounts):
    """The stream accounting plus the training loop's data-wait fraction of step time. Under
    data-parallel training: the totals over every rank, and ``ranks`` (one entry per rank)."""

    data_wait_fraction: float | None = None
    ranks: list[RankStream] | None = None


class AlarmState(BaseModel):
    name: str
    active: bool
    since_step: int | None
    since_time: float | None
    explanation: str
    check: str


class DiagnosticsResponse(BaseModel):
    """``GET /diagnostics``: the trainer's live state (SPEC §6); None = not known yet."""

    status: str  # starting | training | finished | stopped (by a signal, before max_iters)
    time: float  # Unix seconds
    step: int
    meta: MetaSummary | None
    loss: LossNumbers
    batch: BatchNumbers | None
    cumulative: CumulativeNumbers
    attention_probe: ProbeNumbers | None
    stream: StreamNumbers | None
    throughput: Throughput
    alarms: list[AlarmState]


def meta_summary(meta: StreamMeta) -> MetaSummary:
    data = meta.to_dict()
    del data["token_counts"], data["vocab"]
    data["corruption"] = meta.corruption_config
    return MetaSummary(**data, base_size=len(meta.token_counts), content_tokens=sum(meta.token_counts), digest=meta.digest)


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite (JSON has neither)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Diagnostics:
    """Training observer holding the latest diagnostics; every public method is thread-safe.

    Args:
        consumer: the ``DatasetConsumer`` (or None until ``on_start``): giving it here lets the
            stream numbers and the ``starved`` alarm show while the trainer still waits for data.
        probe_interval: run the attention probe at the first eval at least this many steps
            after the previous probe; None = at every eval, 0 = never.
        probe_rows / no_context_positions: size of the fixed probe subset (see trainer.probe).
        alarm_settings: thresholds of trainer.alarms.
        history_length: points kept per history series.
        clock: Unix time source (tests pass a fake one).
        stream_stats: where the ``stream`` numbers come from instead of ``consumer.stats()``
            (``trainer.distributed.Ranks.stream_stats``: every rank's, on rank 0).
    """

    def __init__(
        self,
        consumer: Any = None,
        probe_interval: int | None = None,
        probe_rows: int = 32,
        no_context_positions: int = 256,
        alarm_settings: AlarmSettings = AlarmSettings(),
        history_length: int = HISTORY_LENGTH,
        clock: Callable[[], float] = time.time,
        stream_stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.probe_interval = probe_interval
        self.probe_rows = probe_rows
        self.no_context_positions = no_context_positions
        self.alarm_settings = alarm_settings
        self.clock = clock
        self._stream_stats = stream_stats
        self._lock = threading.Lock()
        self._consumer = consumer
        self._created = clock()
        self._model = None
        self._val_batches: list[dict[str, Any]] = []
        self._probe_set: ProbeSet | None = None
        self._last_probe_step: int | None = None
        self._status = "starting"
        self._step = 0
        self._meta_summary: MetaSummary | None = None
        self._loss = LossNumbers()
        self._throughput = Throughput()
        self._probe: ProbeNumbers | None = None
        self._alarms: dict[str, Alarm] = {}
        self._train_history: deque[dict[str, Any]] = deque(maxlen=history_length)
        self._eval_history: deque[dict[str, Any]] = deque(maxlen=history_length)
        # (time, accepted, rejected, rejected by reason) samples over the alarm window.
        self._stream_samples: deque[tuple[float, int, int, dict[str, int]]] = deque(maxlen=4096)

    # ---- observer interface (training thread) -------------------------------------------

    def on_start(self, trainer: Any) -> None:
        """Attach to ``trainer.consumer``, ``trainer.model`` and ``trainer.val_batches``; pin the floors."""
        with self._lock:
            self._consumer = trainer.consumer
            self._model = trainer.model
            self._val_batches = trainer.val_batches
            self._status = "training"
            self._step = int(trainer.step)
        self.set_meta(trainer.meta)

    def set_meta(self, meta: StreamMeta) -> None:
        floor_train, floor_val = context_free_floor(meta, "train"), context_free_floor(meta, "val")
        with self._lock:
            self._meta_summary = meta_summary(meta)
            self._loss.context_free_floor = floor_train
            self._loss.context_free_floor_val = floor_val

    def on_step(self, step: int, numbers: dict[str, Any]) -> None:
        """``trainer.train`` step numbers; only log steps (``numbers["log"]``) carry the train
        loss (``train_loss``, the mean since the last log) and the throughput figures."""
        with self._lock:
            self._step = step
        if not numbers.get("log"):
            return
        data_wait_pct = finite_or_none(numbers.get("data_wait_pct"))
        throughput = Throughput(
            ms_per_step=finite_or_none(numbers.get("ms_per_step")),
            tokens_per_s=finite_or_none(numbers.get("tokens_per_s")),
            data_wait_fraction=None if data_wait_pct is None else data_wait_pct / 100.0,
        )
        batch = self._batch_numbers()
        cumulative = self._cumulative_numbers()
        with self._lock:
            self._throughput = throughput
            self._loss.train = finite_or_none(numbers.get("train_loss"))
            self._loss.train_step = step
            self._loss.train_by_stage = {str(k): float(v) for k, v in (numbers.get("train_loss_by_stage") or {}).items()}
            point = {"step": step, "time": self.clock(), "loss": self._loss.train, **throughput.model_dump()}
            if batch is not None:
                point.update({f"batch_{key}": value for key, value in batch.mask_ratio.model_dump().items()})
            if cumulative.mask_ratio is not None:
                point.update({f"cumulative_{key}": getattr(cumulative.mask_ratio, key) for key in ("p10", "p50", "p90")})
            self._train_history.append(point)

    def on_eval(self, step: int, numbers: dict[str, Any]) -> None:
        """After an eval (``val_loss``, ``val_loss_by_stage``); runs the attention probe when due."""
        point = {"step": step, "time": self.clock(), "val": finite_or_none(numbers.get("val_loss"))}
        with self._lock:
            self._step = step
            self._loss.val = point["val"]
            self._loss.val_step = step
            self._loss.val_by_stage = {str(k): float(v) for k, v in (numbers.get("val_loss_by_stage") or {}).items()}
        if self._probe_due(step):
            probe = self.run_probe(step)
            point.update({key: getattr(probe, key) for key in ("loss_attn", "loss_noattn", "loss_no_context", "loss_attn_sampled")})
        with self._lock:
            self._eval_history.append(point)

    def on_end(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self._status = "stopped" if "stopped_by" in summary else "finished"
            self._step = int(summary.get("steps", self._step))

    # ---- attention probe ----------------------------------------------------------------

    def _probe_due(self, step: int) -> bool:
        if self.probe_interval == 0 or self._model is None:
            return False
        return self._last_probe_step is None or self.probe_interval is None or step - self._last_probe_step >= self.probe_interval

    def run_probe(self, step: int) -> ProbeNumbers:
        """Run the attention probe now (training thread) and publish it."""
        if self._probe_set is None:
            self._probe_set = build_probe_set(self._val_batches, self.probe_rows, self.no_context_positions)
        started = time.perf_counter()
        result = attention_probe(self._model, self._probe_set)
        probe = ProbeNumbers(step=step, seconds=time.perf_counter() - started, **result)
        with self._lock:
            self._probe = probe
            self._last_probe_step = step
        return probe

    # ---- reading (any thread) -----------------------------------------------------------

    def _batch_numbers(self) -> BatchNumbers | None:
        stats = getattr(self._consumer, "last_batch_stats", None)
        return BatchNumbers(**stats) if stats else None

    def _cumulative_numbers(self) -> CumulativeNumbers:
        histogram = getattr(self._consumer, "cumulative_mask_ratio", None)
        if histogram is None or histogram.count == 0:
            return CumulativeNumbers()
        return CumulativeNumbers(mask_ratio=CumulativePercentiles(**histogram.to_dict()))

    def _stream_window(self, stream: dict[str, Any] | None, now: float) -> tuple[int, int, dict[str, int]]:
        """Messages accepted / rejected (and rejected by reason) over the last ``window_seconds``."""
        if stream is None:
            return 0, 0, {}
        sample = (now, int(stream["accepted"]), int(stream["rejected_total"]), dict(stream["rejected"]))
        self._stream_samples.append(sample)
        while len(self._stream_samples) > 1 and self._stream_samples[0][0] < now - self.alarm_settings.window_seconds:
            self._stream_samples.popleft()
        if len(self._stream_samples) == 1:  # first look: everything so far counts
            return sample[1], sample[2], sample[3]
        _, accepted_then, rejected_then, reasons_then = self._stream_samples[0]
        reasons = {reason: count - reasons_then.get(reason, 0) for reason, count in sample[3].items()}
        return sample[1] - accepted_then, sample[2] - rejected_then, reasons

    def _seconds_without_data(self, stream: dict[str, Any] | None, now: float) -> float | None:
        if stream is None or self._status in ("finished", "stopped"):
            return None
        waited = stream["seconds_since_last_message"]
        return now - self._created if waited is None else waited

    def snapshot(self) -> DiagnosticsResponse:
        """The full ``GET /diagnostics`` answer; also re-evaluates the alarms."""
        consumer = self._consumer
        stream = self._stream_stats() if self._stream_stats is not None else consumer.stats() if consumer is not None else None
        if self._meta_summary is None and getattr(consumer, "meta", None) is not None:
            self.set_meta(consumer.meta)  # pinned while the trainer still prepares
        batch = self._batch_numbers()
        cumulative = self._cumulative_numbers()
        now = self.clock()
        with self._lock:
            accepted, rejected, by_reason = self._stream_window(stream, now)
            inputs = AlarmInputs(
                step=self._step,
                val_loss=self._loss.val,
                floor=self._loss.context_free_floor_val,
                no_context_gap=self._probe.loss_no_context_minus_attn if self._probe is not None else None,
                seconds_without_data=self._seconds_without_data(stream, now),
                window_accepted=accepted,
                window_rejected=rejected,
                window_rejected_by_reason=by_reason,
            )
            self._alarms = evaluate_alarms(inputs, self.alarm_settings, self._alarms, now)
            return DiagnosticsResponse(
                status=self._status,
                time=now,
                step=self._step,
                meta=self._meta_summary,
                loss=self._loss.model_copy(deep=True),
                batch=batch,
                cumulative=cumulative,
                attention_probe=self._probe,
                stream=None if stream is None else StreamNumbers(**stream, data_wait_fraction=self._throughput.data_wait_fraction),
                throughput=self._throughput,
                alarms=[AlarmState(**alarm.to_dict()) for alarm in self._alarms.values()],
            )

    def history(self) -> dict[str, Any]:
        """Column series for the page: ``train`` (per log step), ``eval`` (per eval) and the floors."""
        with self._lock:
            return {
                "train": _columns(self._train_history),
                "eval": _columns(self._eval_history),
                "context_free_floor": self._loss.context_free_floor,
                "context_free_floor_val": self._loss.context_free_floor_val,
            }


def _columns(points: deque[dict[str, Any]]) -> dict[str, list]:
    keys = sorted({key for point in points for key in point})
    return {key: [point.get(key) for point in points] for key in keys}
