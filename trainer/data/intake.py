"""The consumer's receive thread: decode, pin, order, account, collect the val set, assemble train batches.

:class:`Intake` runs in one thread (``DatasetConsumer`` starts it). Its counts live in a
:class:`~trainer.data.accounting.StreamLedger` (locked, read by any thread), the pinned stream in
:class:`~trainer.data.pinning.MetaPins`, the schedule in an :class:`~trainer.data.orders.OrderBook`,
the batches being built in :class:`~trainer.data.batches.TrainBatches`.
The thread orders the val set, then train messages in k order, from the producers that announced
the pinned stream; takes each delivery that was ordered from its sender; hands train messages to
the batches strictly in k order; and stops ordering while the bounded queue of assembled
batches is full (so what is in flight is bounded by the orders). It always keeps reading, so
producers are heard (and a dead one noticed) however slowly the training loop takes batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.meta import StreamMeta
from shared.wire import (
    MetaMessage,
    Order,
    Refusal,
    UnknownMeta,
    WireError,
    WireMessage,
    decode,
    encode_order,
    encode_refusal,
    new_incarnation,
    tensor_names,
)
from trainer.data.accounting import StreamLedger
from trainer.data.assembly import ValSet
from trainer.data.batches import TrainBatches, source_rows_before
from trainer.data.orders import Cursor, OrderBook, OrderSettings
from trainer.data.pinning import MetaPins
from trainer.data.receiver import Receiver
from trainer.data.stats import StreamStats
from trainer.runtime.logs import LIMITED_AT_SOURCE

log = logging.getLogger("trainer.data.consumer")

POLL_SECONDS = 0.1  # the receive thread wakes this often to notice close() and starvation
META_MISMATCH = "meta_mismatch"  # the consumer's own rejection reason, next to shared.wire.REASONS


class Intake:
    """The receive loop and everything it keeps; ``DatasetConsumer`` is its public face.

    Args:
        receiver: the open socket to read from.
        batch_size: rows per assembled batch.
        ready_queue: the bounded queue of finished batches.
        to_host: (wire array, vocab_size) -> host tensor (pinned on CUDA), in this thread.
        record: writes a message's frames to the recording, or None without one.
        starved_after_s: seconds of silence before it says it waits for producers.
        order_settings: credit, look-ahead and timeouts of the schedule.
        rank, world: this consumer's share of the train schedule (data-parallel ranks).
    """

    def __init__(self, receiver: Receiver, batch_size: int, ready_queue: queue.Queue,
                 to_host: Callable[[np.ndarray, int], Any], record: Callable[[Any], None] | None,
                 starved_after_s: float, order_settings: OrderSettings | None = None, rank: int = 0, world: int = 1) -> None:
        self.receiver = receiver
        self.batch_size = batch_size
        self.starved_after_s = starved_after_s
        self.order_settings = order_settings or OrderSettings()
        self.rank, self.world = rank, world
        self.trainer_id = new_incarnation()  # names this consumer's orders: a restarted trainer voids the old ones
        self.ledger = StreamLedger()
        self.pins = MetaPins()
        self.book: OrderBook | None = None  # made when the stream is pinned
        self.val: ValSet | None = None
        self.stopping = threading.Event()
        self.meta_pinned = threading.Event()
        self.val_complete = threading.Event()
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self._queue = ready_queue
        self._to_host = to_host
        self._record = record
        self.batches: TrainBatches | None = None  # made when the stream is pinned
        self._seek: Cursor | None = None  # asked for by the training thread, applied by this one
        self._refused_at: dict[bytes, float] = {}

    @property
    def meta(self) -> StreamMeta | None:
        return self.pins.meta

    def seek(self, cursor: Cursor) -> None:
        """Start the train schedule at ``cursor`` (from the training thread; once)."""
        with self.ledger.lock:
            if self._seek is not None:
                raise RuntimeError("the train schedule has already been started")
            self._seek = cursor

    def stats(self, queue_depth: int) -> StreamStats:
        val_seen = len(self.val.messages) if self.val is not None else 0
        now = time.monotonic()
        stats = self.ledger.stats(now, queue_depth, val_seen, self.meta)
        if self.book is not None:
            with self.ledger.lock:
                self.ledger.schedule_stats(stats, self.book, now, self.meta)
        guard = self.receiver.curve_guard
        if guard is not None:
            stats.curve_accepted, stats.curve_refused = guard.accepted, guard.refused
        return stats

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> None:
        poller = self.receiver.poller()
        try:
            while not self.stopping.is_set():
                waiting = self._move_ready_to_queue()
                self._schedule()
                if not poller.poll(0 if waiting else POLL_SECONDS * 1000):
                    if not waiting:
                        self._check_starved()
                    continue
                for _ in range(64):  # a burst; every delivery frees credit, so orders follow each message
                    self._handle(*self.receiver.receive())
                    self._schedule()
                    if not poller.poll(0):
                        break
        except BaseException as error:  # reported to the training thread by next_batch
            self.error = error
            log.exception("the consumer's receive thread failed")

    def _schedule(self) -> None:
        book = self.book
        if book is None:
            return
        if self._seek is not None and not book.train_started:
            with self.ledger.lock:
                book.start_train(self._seek)
                self.batches.start(self._seek)
            if self.meta.sources:
                with self.ledger.lock:
                    self.ledger.add_source_rows(self.meta, source_rows_before(self.meta, self._seek, self.rank, self.world))
        now = time.monotonic()
        with self.ledger.lock:
            orders = book.expire(now) + book.issue(now)
        for peer, split, index in orders:
            self.receiver.send(peer, encode_order(Order(self.trainer_id, split, index, 1)))

    def _move_ready_to_queue(self) -> bool:
        """Assembles batches and queues them while the queue has room; True while a batch waits
        for room. A full queue is waited on for up to :data:`POLL_SECONDS` (the training thread's
        ``get`` wakes the wait at once), then the loop goes on reading the socket."""
        while True:
            ready = self.batches.ready if self.batches is not None else None
            if not ready:
                self._drain()
                if not ready:
                    return False
            try:
                self._queue.put(ready[0], timeout=POLL_SECONDS)
            except queue.Full:
                return True
            ready.popleft()

    def _check_starved(self) -> None:
        ledger = self.ledger
        silent = time.monotonic() - (ledger.last_message_at or self.started_at)
        if not ledger.starved and silent > self.starved_after_s:
            with ledger.lock:
                ledger.starved = True
            log.warning("waiting for producers: nothing received on %s for %.1f s", self.receiver.endpoint, silent)

    def _handle(self, peer: bytes, frames: list[Any]) -> None:
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
            if error.seq is not None:  # a message its producer sent and we received: no gap
                with ledger.lock:
                    ledger.table.record_rejected(error.producer_id, error.incarnation, error.seq, now)
            self._reject(error.reason, error.detail, error.producer_id)
            return
        if self.meta is None:
            self._pin(message)
        mismatch = self.pins.mismatch(message.meta, message.producer_id)
        if mismatch is not None:
            self._reject(META_MISMATCH, mismatch, message.producer_id)
            self._refuse(peer, META_MISMATCH, mismatch, now)
            return
        split = "meta" if isinstance(message, MetaMessage) else message.split
        if split == "train" and message.rows != self.meta.rows_per_message:
            self._reject("shape", f"a train message of the schedule has {self.meta.rows_per_message} rows, not {message.rows}",
                         message.producer_id)
            return
        with ledger.lock:
            ledger.accepted += 1  # valid and of the pinned stream; the schedule may still drop it
            ledger.table.record(message.producer_id, message.incarnation, message.seq, split, now)
            if split == "meta":
                self.book.hello(peer, message.producer_id, now)
                return
            self.book.heard(peer, now)
            dropped = self.book.deliver(peer, split, message.index)
        if dropped is not None:
            self._drop(dropped, message)
        elif split == "val":
            self._accept_val(message)
        else:
            with ledger.lock:
                self.book.buffer_train(message)
            self._drain()

    def _drop(self, why: str, message: WireMessage) -> None:
        """A valid message that was not ordered from its sender, or already delivered: counted
        in the schedule's numbers (not as a rejection: a late copy after a reassignment is normal), not used."""
        counts = self.book.counts
        count = counts.duplicates if why == "duplicate" else counts.unordered
        if count & (count - 1) == 0:
            log.warning("dropped %s message %s %d from %r (%s, #%d)", why, message.split, message.index, message.producer_id,
                        "delivered already" if why == "duplicate" else "never ordered from it", count,
                        extra=LIMITED_AT_SOURCE)

    def _refuse(self, peer: bytes, reason: str, detail: str, now: float) -> None:
        """Tells a producer why its messages are refused (at most once a second per producer)."""
        if now - self._refused_at.get(peer, float("-inf")) < 1.0:
            return
        if len(self._refused_at) > 1024:
            self._refused_at.clear()
        self._refused_at[peer] = now
        self.receiver.send(peer, encode_refusal(Refusal(self.trainer_id, reason, detail)))
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
        self.batches = TrainBatches(meta, self.batch_size, self._to_host, self._record is not None, self.world)
        self.val = ValSet(meta.val_messages, tensor_names(meta))
        with self.ledger.lock:
            self.book = OrderBook(self.order_settings, meta.rows_per_message, meta.val_messages, self.rank, self.world)
        self.pins.pin(meta)
        if self._record is not None and isinstance(message, MetaMessage):
            self._record(message.frames)  # a replay of the recording pins the same stream first
        log.info("pinned stream %s: block_size %d, vocab_size %d (%s tokenizer), packing %s, %d val messages",
                 meta.digest, meta.block_size, meta.vocab_size, meta.tokenizer, meta.packing, meta.val_messages)
        self.meta_pinned.set()
        if meta.val_messages == 0:
            self.val_complete.set()

    def _accept_val(self, message: WireMessage) -> None:
        with self.ledger.lock:
            self.book.val_received(message.val_index)
        if not self.val.add(message.val_index, message.tensors):
            return
        if self._record is not None:
            self._record(message.frames)
        if self.val.complete:
            log.info("val set complete: %d messages", len(self.val.messages))
            self.val_complete.set()

    def _drain(self) -> None:
        """Hands train messages to the assembler in k order while the head has arrived and the
        assembled batches have room."""
        book = self.book
        while book is not None and not self.batches.ready:
            with self.ledger.lock:
                message = book.pop_head()
                if message is None:
                    return
                skip, book.skip_rows = book.skip_rows, 0
            self.batches.add(message, skip)
