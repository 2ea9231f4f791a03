"""The consumer's receive thread: decode, pin, account, collect the val set, assemble train batches.

:class:`Intake` runs in one thread (``DatasetConsumer`` starts it). Counters and tables it
shares with other threads are behind :attr:`Intake.lock`; the assembled batches wait in a
deque until the bounded queue has room, and while it has none the thread stops reading, so
the socket's high-water mark pushes back on the producers.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.batch_stats import BatchStats, batch_statistics, mask_ratio_counts
from shared.meta import StreamMeta
from shared.wire import WireError, WireMessage, decode
from trainer.data.accounting import ProducerTable, Rejections
from trainer.data.assembly import BatchAssembler, ValSet
from trainer.data.device import HostBatch
from trainer.data.receiver import Receiver
from trainer.data.stats import StreamStats

log = logging.getLogger("trainer.data.consumer")

POLL_SECONDS = 0.1  # the receive thread wakes this often to notice close() and starvation
# Batch statistics are for people and dashboards: computed for every batch while batches come
# slower than this, else for the first batch after each such interval (bounded cost at any rate).
STATS_EVERY_S = 0.05
# Rejection reasons of the consumer itself, next to shared.wire.REASONS.
META_MISMATCH = "meta_mismatch"
TENSOR_SET = "tensor_set"
VALID_LEN = "valid_len"  # the assembler's name for the decoder's per-row valid_len


@dataclass
class ReadyBatch:
    host: HostBatch  # see trainer.data.device.host_tensor
    stats: BatchStats | None  # None when skipped (see STATS_EVERY_S)
    ratio_counts: np.ndarray
    new_messages: list[tuple[str, Any]]  # per message starting in this batch: (producer id, its frames when recording, else None)


class Intake:
    """The receive loop and everything it keeps; ``DatasetConsumer`` is its public face.

    Args:
        receiver: the open socket to read from.
        batch_size: rows per assembled batch.
        ready_queue: the bounded queue of finished batches.
        to_host: wire array -> host tensor (pinned on CUDA), in this thread.
        record: writes a message's frames to the recording, or None without one.
        starved_after_s: seconds of silence before it says it waits for producers.
    """

    def __init__(self, receiver: Receiver, batch_size: int, ready_queue: queue.Queue, to_host: Callable[[np.ndarray], Any],
                 record: Callable[[Any], None] | None, starved_after_s: float) -> None:
        self.receiver = receiver
        self.batch_size = batch_size
        self.starved_after_s = starved_after_s
        self.meta: StreamMeta | None = None
        self.val: ValSet | None = None
        self.lock = threading.Lock()  # guards the counters and tables, read by stats()
        self.stopping = threading.Event()
        self.meta_pinned = threading.Event()
        self.val_complete = threading.Event()
        self.val_waiters = 0
        self.error: BaseException | None = None
        self.received = 0
        self.starved = False
        self.started_at = time.monotonic()
        self._queue = ready_queue
        self._to_host = to_host
        self._record = record
        self._ready: collections.deque[ReadyBatch] = collections.deque()  # assembled, waiting for queue space
        self._assembler: BatchAssembler | None = None
        self._tensor_names: tuple[str, ...] = ()
        self._table = ProducerTable()
        self._rejections = Rejections()
        self._accepted = 0
        self._consumed_messages = 0
        self._consumed_batches = 0
        self._dropped_train = 0
        self._last_message_at: float | None = None
        self._stats_at = float("-inf")  # when batch statistics were last computed

    # ---- read by other threads -------------------------------------------------------

    def count_consumed(self, new_messages: list[tuple[str, Any]]) -> None:
        """A batch starting these messages was handed to the training loop."""
        with self.lock:
            self._consumed_messages += len(new_messages)
            for producer_id, _ in new_messages:
                self._table.count_consumed(producer_id)
            self._consumed_batches += 1

    def stats(self, queue_depth: int) -> StreamStats:
        now = time.monotonic()
        with self.lock:
            return StreamStats(
                received=self.received,
                accepted=self._accepted,
                rejected=dict(self._rejections.by_reason),
                rejected_by_producer={producer: dict(reasons) for producer, reasons in self._rejections.by_producer.items()},
                rejected_total=self._rejections.total,
                consumed_messages=self._consumed_messages,
                consumed_batches=self._consumed_batches,
                dropped_train=self._dropped_train,
                gaps=self._table.total("gaps"),
                duplicates=self._table.total("duplicates"),
                out_of_order=self._table.total("out_of_order"),
                producers=self._table.rows(now),
                starved=self.starved,
                seconds_since_last_message=None if self._last_message_at is None else round(now - self._last_message_at, 3),
                queue_depth=queue_depth,
                val_messages_seen=len(self.val.messages) if self.val is not None else 0,
                val_messages_total=None if self.meta is None else self.meta.val_messages,
                meta_digest=None if self.meta is None else self.meta.digest,
            )

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> None:
        poller = self.receiver.poller()
        try:
            while not self.stopping.is_set():
                if not self._move_ready_to_queue():
                    continue
                if not poller.poll(POLL_SECONDS * 1000):
                    self._check_starved()
                    continue
                self._handle(self.receiver.receive())
        except BaseException as error:  # reported to the training thread by next_batch
            self.error = error
            log.exception("the consumer's receive thread failed")

    def _val_wanted(self) -> bool:
        return self.val_waiters > 0 and not self.val_complete.is_set()

    def _move_ready_to_queue(self) -> bool:
        """Queues assembled batches; False while the queue is full and reading must pause."""
        while self._ready:
            keep_reading = self._val_wanted()
            try:
                self._queue.put(self._ready[0], block=not keep_reading, timeout=POLL_SECONDS)
            except queue.Full:
                return keep_reading
            self._ready.popleft()
        return True

    def _check_starved(self) -> None:
        silent = time.monotonic() - (self._last_message_at or self.started_at)
        if not self.starved and silent > self.starved_after_s:
            with self.lock:
                self.starved = True
            log.warning("waiting for producers: nothing received on %s for %.1f s", self.receiver.endpoint, silent)

    def _handle(self, frames: list[Any]) -> None:
        now = time.monotonic()
        with self.lock:
            self.received += 1
            if self.starved:
                self.starved = False
                log.warning("producers are back: a message arrived after %.1f s", now - (self._last_message_at or self.started_at))
            self._last_message_at = now
        try:
            message = decode(frames)
        except WireError as error:
            self._reject(error.reason, error.detail, error.producer_id)
            return
        if self.meta is None:
            self._pin(message)
        elif message.meta is not self.meta and message.meta.digest != self.meta.digest:
            self._reject(META_MISMATCH, self._mismatch(message), message.producer_id)
            return
        if tuple(sorted(message.tensors)) != self._tensor_names:
            self._reject(
                TENSOR_SET,
                f"producer {message.producer_id!r} sent tensors {sorted(message.tensors)}, the stream has {list(self._tensor_names)}",
                message.producer_id,
            )
            return
        with self.lock:
            self._accepted += 1
            self._table.record(message.producer_id, message.seq, message.split, now)
        if message.split == "val":
            self._accept_val(message)
        else:
            self._accept_train(message)

    def _mismatch(self, message: WireMessage) -> str:
        differences = self.meta.differences(message.meta)
        field_name, mine, theirs = differences[0]
        also = f" (also differs: {', '.join(name for name, _, _ in differences[1:])})" if len(differences) > 1 else ""
        return f"producer {message.producer_id!r}: field {field_name} is {theirs!r:.200}, the pinned stream has {mine!r:.200}{also}"

    def _reject(self, reason: str, detail: str, producer_id: str | None = None) -> None:
        """Counts a rejected message by reason, and by producer when its header was readable."""
        with self.lock:
            count = self._rejections.count(reason, producer_id)
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th... of each reason
            log.warning("rejected message (%s, #%d): %s", reason, count, detail)

    def _pin(self, message: WireMessage) -> None:
        meta = message.meta
        self._tensor_names = tuple(sorted(message.tensors))
        templates = {name: message.tensors[name] for name in self._tensor_names}
        self._assembler = BatchAssembler(self.batch_size, {**templates, VALID_LEN: message.valid_len})
        self.val = ValSet(meta.val_messages, self._tensor_names)
        self.meta = meta
        log.info("pinned stream %s: block_size %d, vocab_size %d, packing %s, %d val messages",
                 meta.digest, meta.block_size, meta.vocab_size, meta.packing, meta.val_messages)
        self.meta_pinned.set()
        if meta.val_messages == 0:
            self.val_complete.set()

    def _accept_val(self, message: WireMessage) -> None:
        if not self.val.add(message.val_index, message.tensors):
            return
        if self._record is not None:
            self._record(message.frames)
        if self.val.complete:
            log.info("val set complete: %d messages", len(self.val.messages))
            self.val_complete.set()

    def _accept_train(self, message: WireMessage) -> None:
        if self._ready:  # the queue is full and a val waiter needs us to read on (see wait_for_val_set)
            with self.lock:
                self._dropped_train += 1
                self._table.count_dropped(message.producer_id)
            return
        tag = (message.producer_id, message.frames if self._record is not None else None)
        arrays = {**message.tensors, VALID_LEN: message.valid_len}
        for batch, tags in self._assembler.add(arrays, tag):
            valid_len = batch.pop(VALID_LEN)
            now = time.monotonic()
            stats = None
            if now - self._stats_at >= STATS_EVERY_S:
                self._stats_at = now
                stats = batch_statistics(batch["x"], batch["y"], valid_len, batch["mask_ratio"],
                                         self.meta.mask_id, self.meta.ignore_index)
            self._ready.append(ReadyBatch(host={name: self._to_host(array) for name, array in batch.items()}, stats=stats,
                                          ratio_counts=mask_ratio_counts(batch["mask_ratio"]), new_messages=tags))
