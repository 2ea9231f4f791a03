"""The consumer's receive thread: decode, pin, account, collect the val set, assemble train batches.

:class:`Intake` runs in one thread (``DatasetConsumer`` starts it). Its counts live in a
:class:`~trainer.data.accounting.StreamLedger` (locked, read by any thread), the pinned stream in
:class:`~trainer.data.pinning.MetaPins`. The assembled batches wait in a deque until the bounded
queue has room, and while it has none the thread stops reading, so the socket's high-water mark
pushes back on the producers.
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
from shared.wire import MetaMessage, UnknownMeta, WireError, WireMessage, decode, tensor_dtypes
from trainer.data.accounting import StreamLedger
from trainer.data.assembly import BatchAssembler, ValSet
from trainer.data.device import HostBatch
from trainer.data.pinning import MetaPins
from trainer.data.receiver import Receiver
from trainer.data.stats import StreamStats
from trainer.logs import LIMITED_AT_SOURCE

log = logging.getLogger("trainer.data.consumer")

POLL_SECONDS = 0.1  # the receive thread wakes this often to notice close() and starvation
# Batch statistics are for people and dashboards: computed for every batch while batches come
# slower than this, else for the first batch after each such interval (bounded cost at any rate).
STATS_EVERY_S = 0.05
META_MISMATCH = "meta_mismatch"  # the consumer's own rejection reason, next to shared.wire.REASONS
VALID_LEN = "valid_len"  # the assembler's name for the decoder's per-row valid_len


@dataclass
class ReadyBatch:
    host: HostBatch  # see trainer.data.device.host_tensor
    stats: BatchStats | None  # None when skipped (see STATS_EVERY_S)
    ratio_counts: np.ndarray
    new_messages: list[tuple[str, Any]]  # per message starting in this batch: (producer id, its frames when recording, else None)


def stream_tensors(meta: StreamMeta) -> tuple[str, ...]:
    """The tensor names of every batch of a stream (sorted): ``stage`` only with stages."""
    names = ["attention_mask", "mask_ratio", "x", "y"]
    return tuple(sorted(names + ["stage"])) if meta.corruption_config["policy"] == "stages" else tuple(names)


class Intake:
    """The receive loop and everything it keeps; ``DatasetConsumer`` is its public face.

    Args:
        receiver: the open socket to read from.
        batch_size: rows per assembled batch.
        ready_queue: the bounded queue of finished batches.
        to_host: (wire array, vocab_size) -> host tensor (pinned on CUDA), in this thread.
        record: writes a message's frames to the recording, or None without one.
        starved_after_s: seconds of silence before it says it waits for producers.
    """

    def __init__(self, receiver: Receiver, batch_size: int, ready_queue: queue.Queue,
                 to_host: Callable[[np.ndarray, int], Any], record: Callable[[Any], None] | None,
                 starved_after_s: float) -> None:
        self.receiver = receiver
        self.batch_size = batch_size
        self.starved_after_s = starved_after_s
        self.ledger = StreamLedger()
        self.pins = MetaPins()
        self.val: ValSet | None = None
        self.stopping = threading.Event()
        self.meta_pinned = threading.Event()
        self.val_complete = threading.Event()
        self.val_waiters = 0
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self._queue = ready_queue
        self._to_host = to_host
        self._record = record
        self._ready: collections.deque[ReadyBatch] = collections.deque()  # assembled, waiting for queue space
        self._assembler: BatchAssembler | None = None
        self._stats_at = float("-inf")  # when batch statistics were last computed

    @property
    def meta(self) -> StreamMeta | None:
        return self.pins.meta

    def stats(self, queue_depth: int) -> StreamStats:
        val_seen = len(self.val.messages) if self.val is not None else 0
        stats = self.ledger.stats(time.monotonic(), queue_depth, val_seen, self.meta)
        guard = self.receiver.curve_guard
        if guard is not None:
            stats.curve_accepted, stats.curve_refused = guard.accepted, guard.refused
        return stats

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
        ledger = self.ledger
        silent = time.monotonic() - (ledger.last_message_at or self.started_at)
        if not ledger.starved and silent > self.starved_after_s:
            with ledger.lock:
                ledger.starved = True
            log.warning("waiting for producers: nothing received on %s for %.1f s", self.receiver.endpoint, silent)

    def _handle(self, frames: list[Any]) -> None:
        now = time.monotonic()
        ledger = self.ledger
        with ledger.lock:
            ledger.received += 1
            if ledger.starved:
                ledger.starved = False
                log.warning("producers are back: a message arrived after %.1f s", now - (ledger.last_message_at or self.started_at))
            ledger.last_message_at = now
        try:
            message = decode(frames, self.pins.known)
        except UnknownMeta as unknown:
            self._awaiting_meta(unknown)
            return
        except WireError as error:
            self._reject(error.reason, error.detail, error.producer_id)
            return
        if self.meta is None:
            self._pin(message)
        mismatch = self.pins.mismatch(message.meta, message.producer_id)
        if mismatch is not None:
            self._reject(META_MISMATCH, mismatch, message.producer_id)
            return
        split = "meta" if isinstance(message, MetaMessage) else message.split
        with ledger.lock:
            ledger.accepted += 1
            ledger.table.record(message.producer_id, message.incarnation, message.seq, split, now)
        if split == "val":
            self._accept_val(message)
        elif split == "train":
            self._accept_train(message)

    def _awaiting_meta(self, unknown: UnknownMeta) -> None:
        """A batch whose meta message has not come yet (a trainer that joined mid-stream): dropped, counted."""
        with self.ledger.lock:
            self.ledger.awaiting_meta += 1
            count = self.ledger.awaiting_meta
        if count & (count - 1) == 0:
            log.info("dropped a batch of producer %r awaiting its meta message (#%d): %s", unknown.producer_id, count,
                     unknown.detail)

    def _reject(self, reason: str, detail: str, producer_id: str | None = None) -> None:
        """Counts a rejected message by reason, and by producer when its header was readable."""
        with self.ledger.lock:
            count = self.ledger.rejections.count(reason, producer_id)
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th... of each reason from each producer
            sender = "" if producer_id is None else f" from {producer_id!r:.80}"
            log.warning("rejected message%s (%s, #%d): %s", sender, reason, count, detail, extra=LIMITED_AT_SOURCE)

    def _pin(self, message: WireMessage | MetaMessage) -> None:
        meta = message.meta
        names = stream_tensors(meta)
        dtypes = tensor_dtypes(meta)
        templates = {name: np.empty((1, meta.block_size) if name in ("x", "y", "attention_mask") else (1,), dtypes[name])
                     for name in names}
        self._assembler = BatchAssembler(self.batch_size, {**templates, VALID_LEN: np.empty(1, np.int64)})
        self.val = ValSet(meta.val_messages, names)
        self.pins.pin(meta)
        if self._record is not None and isinstance(message, MetaMessage):
            self._record(message.frames)  # a replay of the recording pins the same stream first
        log.info("pinned stream %s: block_size %d, vocab_size %d (%s tokenizer), packing %s, %d val messages",
                 meta.digest, meta.block_size, meta.vocab_size, meta.tokenizer, meta.packing, meta.val_messages)
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
            with self.ledger.lock:
                self.ledger.dropped_train += 1
                self.ledger.table.count_dropped(message.producer_id)
            return
        tag = (message.producer_id, message.frames if self._record is not None else None)
        arrays = {**message.tensors, VALID_LEN: message.valid_len}
        vocab_size = self.meta.vocab_size
        for batch, tags in self._assembler.add(arrays, tag):
            valid_len = batch.pop(VALID_LEN)
            now = time.monotonic()
            stats = None
            if now - self._stats_at >= STATS_EVERY_S:
                self._stats_at = now
                stats = batch_statistics(batch["x"], batch["y"], valid_len, batch["mask_ratio"],
                                         self.meta.mask_id, self.meta.ignore_index)
            self._ready.append(ReadyBatch(host={name: self._to_host(array, vocab_size) for name, array in batch.items()},
                                          stats=stats, ratio_counts=mask_ratio_counts(batch["mask_ratio"]), new_messages=tags))

    def count_consumed(self, new_messages: list[tuple[str, Any]]) -> None:
        """A batch starting these messages was handed to the training loop."""
        with self.ledger.lock:
            self.ledger.consumed_messages += len(new_messages)
            for producer_id, _ in new_messages:
                self.ledger.table.count_consumed(producer_id)
            self.ledger.consumed_batches += 1
