"""The trainer side of the stream (docs/SPEC.md §4): receive, validate, account, assemble batches.

``DatasetConsumer`` owns a ZeroMQ ROUTER socket (:class:`~trainer.data.receiver.Receiver`;
bound by default, producers connect) and a receive thread (:class:`Intake`). The thread
decodes every message with ``shared.wire.decode``, pins the stream meta on the first accepted
message, orders the fixed val set and then the train messages in k order from the producers
(:mod:`trainer.data.orders`: the trainer owns the schedule and its cursor), keeps per-producer
sequence accounting, packs train rows strictly in k order into batches of exactly
``batch_size`` rows, computes their statistics (``shared.batch_stats``:
every batch's rows go into the cumulative mask-ratio histogram; the full per-batch statistics
at most every :data:`STATS_EVERY_S`) and puts them on a bounded queue, still at the wire's
dtypes; :meth:`DatasetConsumer.next_batch` widens them in the caller's thread (on CUDA after
the copy to the device). When the queue is full the thread stops ordering: memory stays bounded.
Every batch handed out comes with the :class:`~trainer.data.orders.Cursor` after it
(:attr:`DatasetConsumer.cursor`); :meth:`DatasetConsumer.seek` starts the schedule at a saved
one, so a resumed run trains on exactly the batches an uninterrupted one would have.

Example::

    with DatasetConsumer("tcp://*:5555", batch_size=32) as consumer:
        meta = consumer.wait_for_meta(timeout=60)
        consumer.wait_for_val_set(timeout=60)
        val = consumer.val_batches()
        consumer.seek(Cursor())              # or a cursor saved with a checkpoint (optional: the default)
        batch = consumer.next_batch()   # {"x": (B, T) int64, "y": ..., "attention_mask": ..., "mask_ratio": (B,) float32}
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from shared.batch_stats import BatchStats, MaskRatioHistogram
from shared.curve import CurveServer
from shared.meta import StreamMeta
from shared.recording import RecordingWriter
from trainer.data.batches import ReadyBatch
from trainer.data.device import host_tensor, to_device
from trainer.data.intake import POLL_SECONDS, Intake
from trainer.data.orders import Cursor, OrderSettings
from trainer.data.receiver import MAX_FRAME_BYTES, Receiver
from trainer.data.source import Batch
from trainer.data.stats import StreamStats

log = logging.getLogger(__name__)


class DatasetConsumer:
    """Receives a Linepack stream and hands out training batches; see the module docstring.

    Args:
        endpoint: ZeroMQ endpoint, e.g. ``tcp://*:5555`` (``tcp://127.0.0.1:*`` picks a free
            port; :attr:`endpoint` then holds the real one after :meth:`start`).
        batch_size: rows per training batch (independent of the producers' rows per message).
        device: where :meth:`next_batch` puts tensors (``cpu``, ``cuda``, ``cuda:1``...).
        bind: bind (default; producers connect) or connect (producers bind).
        queue_batches: assembled batches kept ready; the back-pressure bound.
        record_path: when set, every message handed out is written there (docs/SPEC.md §5): a train
            message when its first row goes into a handed-out batch, each val message once,
            in the order the val indices are first accepted. Replaying the file into a fresh
            consumer with the same ``batch_size`` gives the same batches in the same order.
        starved_after_s: seconds without any message before the consumer says it is waiting.
        max_frame_bytes: a peer that sends a larger frame is disconnected by ZeroMQ unread
            (that frame is never buffered; ZeroMQ does not limit the number of frames of one
            message, so this bounds single frames, not a hostile peer, see docs/SECURITY.md).
        curve: when set, the socket is a CurveZMQ server that accepts only the producers whose
            public keys it lists (``shared.curve``); others never get a message through.
        orders: credit, look-ahead and reassignment timeouts of the schedule.
        rank, world: this consumer trains on train messages ``k = rank + j*world`` (data-parallel ranks).
    """

    def __init__(
        self,
        endpoint: str,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        bind: bool = True,
        queue_batches: int = 8,
        record_path: str | None = None,
        starved_after_s: float = 5.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        curve: CurveServer | None = None,
        orders: OrderSettings | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.record_path = record_path
        self.receiver = Receiver(endpoint, bind, max_frame_bytes, curve)
        self.last_batch_stats: BatchStats | None = None  # of the latest handed-out batch that has them (STATS_EVERY_S)
        self.cumulative_mask_ratio = MaskRatioHistogram()
        self._queue: queue.Queue[ReadyBatch] = queue.Queue(maxsize=queue_batches)
        self._record_lock = threading.Lock()
        self._recorder: RecordingWriter | None = None
        self._thread: threading.Thread | None = None
        self._val_batches: list[Batch] | None = None
        self.cursor = Cursor(world=world)  # after the last batch handed out by next_batch
        self._seeked = False
        self.intake = Intake(self.receiver, batch_size, self._queue, lambda array, vocab_size: host_tensor(self.device, array, vocab_size),
                             self._record if record_path is not None else None, starved_after_s, orders, rank, world)

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    @property
    def meta(self) -> StreamMeta | None:
        return self.intake.meta

    @property
    def curve_guard(self):
        return self.receiver.curve_guard

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> DatasetConsumer:
        """Binds (or connects) the socket and starts the receive thread; returns self."""
        try:
            self.receiver.open()
        except Exception:
            self.close()
            raise
        if self.record_path is not None:
            self._recorder = RecordingWriter(self.record_path, {"recorded_by": "trainer.consumer", "batch_size": self.batch_size})
        self.intake.started_at = time.monotonic()
        self._thread = threading.Thread(target=self.intake.run, name="linepack-consumer", daemon=True)
        self._thread.start()
        log.info("consumer %s %s, batch_size %d", "bound to" if self.receiver.bind else "connected to", self.endpoint,
                 self.batch_size)
        return self

    def close(self) -> None:
        """Stops the receive thread, closes the socket and flushes the recording. Idempotent."""
        self.intake.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.receiver.close()
        with self._record_lock:
            if self._recorder is not None:
                self._recorder.close()

    def __enter__(self) -> DatasetConsumer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, frames) -> None:
        if self._recorder is not None:
            with self._record_lock:
                self._recorder.write(frames)

    # ---- the training thread's side --------------------------------------------------

    def wait_for_meta(self, timeout: float | None = None) -> StreamMeta:
        """The pinned stream meta, once the first message is accepted; raises TimeoutError."""
        if not self.intake.meta_pinned.wait(timeout):
            raise TimeoutError(f"no valid message arrived on {self.endpoint} within {timeout} s")
        return self.meta

    def wait_for_val_set(self, timeout: float | None = None) -> bool:
        """Waits until every val message has arrived; True if it has."""
        return self.intake.val_complete.wait(timeout)

    def seek(self, cursor: Cursor) -> None:
        """Starts the train schedule at ``cursor`` (a cursor saved after a batch: the next batch
        is the one that followed it). Call at most once, before the first :meth:`next_batch`,
        which otherwise starts it at the beginning. A cursor of another world size is mapped
        by :meth:`Cursor.for_world`."""
        if self._seeked:
            raise RuntimeError("seek() comes once, before the first next_batch()")
        self._seeked = True
        self.cursor = cursor.for_world(self.intake.world, self.intake.rank)
        self.intake.seek(self.cursor)

    def next_batch(self, split: str = "train", timeout: float | None = None) -> Batch:
        """The next train batch: ``x``, ``y``, ``attention_mask`` int64 (B, T), ``mask_ratio``
        float32 (B,), ``stage`` int64 (B,) when the stream has stages, ``source`` int64 (B,) for a
        mixture, on :attr:`device`.

        Blocks until a batch is ready: forever when ``timeout`` is None (the consumer logs
        that it waits for producers), else raises TimeoutError after ``timeout`` seconds.
        Val batches come from :meth:`val_batches`.
        """
        if split != "train":
            raise ValueError(f"next_batch serves the train split; the fixed val set comes from val_batches(), not {split!r}")
        if not self._seeked:
            self.seek(self.cursor)
        ready = self._take(timeout)
        for _, frames in ready.new_messages:
            self._record(frames)
        self.cursor = ready.cursor
        self.intake.ledger.count_consumed(self.meta, ready.new_messages, ready.cursor, ready.source_rows)
        if ready.stats is not None:
            self.last_batch_stats = ready.stats
        self.cumulative_mask_ratio.add_counts(ready.ratio_counts)
        return to_device(self.device, ready.host)

    def _take(self, timeout: float | None) -> ReadyBatch:
        intake = self.intake
        if intake.stopping.is_set():
            raise RuntimeError("the consumer is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_SECONDS * 5 if deadline is None else max(0.0, min(deadline - time.monotonic(), POLL_SECONDS * 5))
            try:
                return self._queue.get(timeout=wait)
            except queue.Empty:
                if intake.error is not None:
                    raise RuntimeError("the consumer's receive thread failed") from intake.error
                if intake.stopping.is_set():
                    raise RuntimeError("the consumer is closed") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"no train batch within {timeout} s on {self.endpoint} "
                        f"(received {intake.ledger.received} messages, starved={intake.ledger.starved})"
                    ) from None

    def val_batches(self) -> list[Batch]:
        """The fixed val set in val_index order, in batches of ``batch_size`` rows (the last may
        be smaller), as :meth:`next_batch` dicts. Raises RuntimeError before the set is complete."""
        val = self.intake.val
        if not self.intake.val_complete.is_set():
            raise RuntimeError(f"the val set is incomplete ({len(val.messages) if val else 0} of "
                               f"{self.meta.val_messages if self.meta else '?'} messages)")
        if self._val_batches is None:
            arrays = val.batches(self.batch_size) if val is not None else []
            self._val_batches = [
                to_device(self.device, {name: host_tensor(self.device, array, self.meta.vocab_size) for name, array in batch.items()})
                for batch in arrays
            ]
        return self._val_batches

    def stats(self) -> StreamStats:
        """Stream accounting (docs/SPEC.md §6 ``stream``); safe from any thread."""
        return self.intake.stats(self._queue.qsize())
