"""Per-producer sequence accounting and rejection counts (docs/SPEC.md §4, §10; docs/PROTOCOL.md §6).

Memory is bounded whatever arrives: at most :data:`MAX_TRACKED_PRODUCERS` ids are tracked by
name (later ones share the :data:`OTHER` row), each keeps at most :data:`MAX_MISSING_RANGES`
ranges of missing sequence numbers, and a sequence number implausibly far from a producer's
window (:data:`SEQ_WINDOW`) is a counted anomaly that changes nothing else, so one forged
message cannot poison a genuine producer's accounting. Used by the consumer's receive thread
under the ledger's lock.
"""

from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.meta import StreamMeta
from trainer.data.orders import Cursor, OrderBook
from trainer.data.stats import ProducerRow, StreamStats

MAX_TRACKED_PRODUCERS = 256
OTHER = "(other)"  # the row of every producer id beyond MAX_TRACKED_PRODUCERS
MAX_MISSING_RANGES = 64
SEQ_WINDOW = 1 << 20  # a seq this far beyond the last (or before the first) is an anomaly, not a gap


@dataclass
class _ProducerState:
    incarnation: str
    first_seq: int
    last_seq: int
    last_seen: float
    messages: int = 0
    meta: int = 0
    train: int = 0
    val: int = 0
    rejected: int = 0
    gaps: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    seq_anomalies: int = 0
    restarts: int = 0
    consumed: int = 0
    # Missing sequence numbers of this incarnation as sorted, disjoint [low, high) ranges, and
    # the end of the newest range the cap dropped (numbers below it may have been forgotten).
    missing: list[list[int]] = field(default_factory=list)
    forgotten_below: int = -1

    def restart(self, incarnation: str, seq: int) -> None:
        """A new incarnation (the producer process restarted): a new sequence, totals kept."""
        self.incarnation, self.first_seq, self.last_seq, self.missing = incarnation, seq, seq, []
        self.forgotten_below = -1
        self.restarts += 1

    def add_missing(self, low: int, high: int, front: bool = False) -> None:
        if low >= high:
            return
        self.gaps += high - low
        if front:
            self.missing.insert(0, [low, high])
        else:
            self.missing.append([low, high])
        excess = len(self.missing) - MAX_MISSING_RANGES
        if excess > 0:  # the oldest become lost for good
            self.forgotten_below = max(self.forgotten_below, self.missing[excess - 1][1])
            del self.missing[:excess]

    def fill(self, seq: int) -> bool:
        """Takes ``seq`` out of the missing ranges; False when it is not missing."""
        index = bisect.bisect_right(self.missing, [seq, float("inf")]) - 1
        if index < 0 or not self.missing[index][0] <= seq < self.missing[index][1]:
            return False
        low, high = self.missing[index]
        self.missing[index : index + 1] = [pair for pair in ([low, seq], [seq + 1, high]) if pair[0] < pair[1]]
        self.gaps -= 1
        return True


class ProducerTable:
    """Sequence accounting per producer id and incarnation (docs/PROTOCOL.md §6).

    ``gaps`` counts sequence numbers between the first and last seen message of an incarnation
    that never arrived; a late arrival fills its gap again and counts as ``out_of_order``; a
    number seen twice counts as a ``duplicate``. The first message seen from a producer starts
    its count (a trainer that joins late has not lost the earlier messages), and so does a new
    incarnation (a restart, counted in ``restarts``). A number more than :data:`SEQ_WINDOW`
    away from the window counts in ``seq_anomalies`` only. A late arrival into a range dropped
    by the :data:`MAX_MISSING_RANGES` cap counts as ``out_of_order`` and leaves ``gaps`` as it was.
    """

    def __init__(self) -> None:
        self._states: dict[str, _ProducerState] = {}

    def _state(self, producer_id: str, incarnation: str, seq: int, now: float) -> tuple[_ProducerState, bool]:
        """The state of ``producer_id`` (the shared other row beyond the cap), and whether it is new."""
        state = self._states.get(producer_id)
        if state is not None:
            return state, False
        if len(self._states) >= MAX_TRACKED_PRODUCERS:
            producer_id = OTHER
            if OTHER in self._states:
                return self._states[OTHER], False
        state = self._states[producer_id] = _ProducerState(incarnation, seq, seq, now)
        return state, True

    def record(self, producer_id: str, incarnation: str, seq: int, split: str, now: float) -> None:
        """One message of ``producer_id``: ``split`` is train, val or meta (accepted), or
        ``rejected`` (see :meth:`record_rejected`)."""
        state, new = self._state(producer_id, incarnation, seq, now)
        state.messages += 1
        state.last_seen = now
        setattr(state, split, getattr(state, split) + 1)
        if new or state is self._states.get(OTHER):
            return
        if incarnation != state.incarnation:
            state.restart(incarnation, seq)
        elif seq > state.last_seq + SEQ_WINDOW or seq < state.first_seq - SEQ_WINDOW:
            state.seq_anomalies += 1
        elif seq > state.last_seq:
            state.add_missing(state.last_seq + 1, seq)
            state.last_seq = seq
        elif seq < state.first_seq:
            state.add_missing(seq + 1, state.first_seq, front=True)
            state.first_seq = seq
            state.out_of_order += 1
        elif state.fill(seq):
            state.out_of_order += 1
        elif seq < state.forgotten_below:
            state.out_of_order += 1  # perhaps into a range the cap forgot: it was counted lost
        else:
            state.duplicates += 1

    def record_rejected(self, producer_id: str, incarnation: str, seq: int, now: float) -> None:
        """A rejected message whose header named a producer already in the table: it counts in
        that producer's sequence (sent and received, so no gap), as ``rejected``. Ids the table
        does not know (forgers, a stream never accepted) get no row."""
        if producer_id in self._states:
            self.record(producer_id, incarnation, seq, "rejected", now)

    def _row_state(self, producer_id: str) -> _ProducerState:
        return self._states.get(producer_id) or self._states[OTHER]

    def count_consumed(self, producer_id: str) -> None:
        """One more train message of a recorded producer went into a handed-out batch."""
        self._row_state(producer_id).consumed += 1

    def total(self, name: str) -> int:
        return sum(getattr(state, name) for state in self._states.values())

    def rows(self, now: float) -> dict[str, ProducerRow]:
        return {
            producer_id: ProducerRow(
                messages=s.messages, meta=s.meta, train=s.train, val=s.val, rejected=s.rejected, first_seq=s.first_seq, last_seq=s.last_seq,
                gaps=s.gaps, duplicates=s.duplicates, out_of_order=s.out_of_order, seq_anomalies=s.seq_anomalies,
                restarts=s.restarts, incarnation=s.incarnation, consumed=s.consumed,
                seconds_since_last=round(now - s.last_seen, 3),
            )
            for producer_id, s in self._states.items()
        }


class Rejections:
    """Rejected messages counted by reason, and by reason per producer where the header named
    one (at most :data:`MAX_TRACKED_PRODUCERS` ids by name, the rest in :data:`OTHER`)."""

    def __init__(self) -> None:
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.by_producer: dict[str, collections.Counter[str]] = {}
        self.unnamed: collections.Counter[str] = collections.Counter()  # rejects whose header named no producer

    def count(self, reason: str, producer_id: str | None) -> int:
        """Counts one reject; returns how many of this reason there are now from this producer
        (from all that named none, or from :data:`OTHER` once the table is full)."""
        self.by_reason[reason] += 1
        if producer_id is None:
            self.unnamed[reason] += 1
            return self.unnamed[reason]
        if producer_id not in self.by_producer and len(self.by_producer) >= MAX_TRACKED_PRODUCERS:
            producer_id = OTHER
        counts = self.by_producer.setdefault(producer_id, collections.Counter())
        counts[reason] += 1
        return counts[reason]

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


class StreamLedger:
    """Every count the consumer keeps, behind one lock (the receive thread writes, any thread reads).

    ``received`` counts every message read from the socket; it is then accepted, rejected
    (by reason), or dropped as ``awaiting_meta`` (a batch whose meta message has not arrived).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.accepted = 0
        self.awaiting_meta = 0
        self.consumed_messages = 0
        self.consumed_batches = 0
        self.starved = False
        self.cursor: Cursor | None = None  # after the last batch handed to the training loop
        self.last_message_at: float | None = None
        self.table = ProducerTable()
        self.rejections = Rejections()
        self.rows_by_source: collections.Counter[str] = collections.Counter()  # train rows handed out, by source name

    def count_consumed(self, meta: StreamMeta, new_messages: list[tuple[str, Any]], cursor: Cursor,
                       source_rows: np.ndarray | None = None) -> None:
        """A batch starting these messages (producer id, frames), ending at ``cursor``, with
        ``source_rows`` rows of each source of a mixture, was handed to the training loop."""
        with self.lock:
            if source_rows is not None:
                self.add_source_rows(meta, source_rows)
            self.cursor = cursor
            self.consumed_messages += len(new_messages)
            for producer_id, _ in new_messages:
                self.table.count_consumed(producer_id)
            self.consumed_batches += 1

    def add_source_rows(self, meta: StreamMeta, source_rows: np.ndarray) -> None:
        """Adds rows per source index (len(meta.sources),) to :attr:`rows_by_source`; call under the lock."""
        for source, rows in zip(meta.sources, source_rows.tolist()):
            self.rows_by_source[source.name] += rows

    def stats(self, now: float, queue_depth: int, val_seen: int, meta: StreamMeta | None) -> StreamStats:
        with self.lock:
            return StreamStats(
                received=self.received,
                accepted=self.accepted,
                awaiting_meta=self.awaiting_meta,
                rejected=dict(self.rejections.by_reason),
                rejected_by_producer={producer: dict(reasons) for producer, reasons in self.rejections.by_producer.items()},
                rejected_total=self.rejections.total,
                consumed_messages=self.consumed_messages,
                consumed_batches=self.consumed_batches,
                gaps=self.table.total("gaps"),
                duplicates=self.table.total("duplicates"),
                out_of_order=self.table.total("out_of_order"),
                seq_anomalies=self.table.total("seq_anomalies"),
                restarts=self.table.total("restarts"),
                producers=self.table.rows(now),
                starved=self.starved,
                seconds_since_last_message=None if self.last_message_at is None else round(now - self.last_message_at, 3),
                queue_depth=queue_depth,
                val_messages_seen=val_seen,
                val_messages_total=None if meta is None else meta.val_messages,
                meta_digest=None if meta is None else meta.digest,
                rows_by_source=dict(self.rows_by_source),
            )

    def schedule_stats(self, stats: StreamStats, book: OrderBook, now: float, meta: StreamMeta) -> None:
        """Adds the schedule's numbers (the cursor, the orders, the reorder buffer) to ``stats``;
        call under :attr:`lock`."""
        counts = book.counts
        stats.orders_issued, stats.orders_delivered = counts.ordered, counts.delivered
        stats.orders_reassigned, stats.orders_duplicate, stats.orders_unordered = counts.reassigned, counts.duplicates, counts.unordered
        stats.orders_outstanding, stats.reorder_depth = book.outstanding, len(book.buffer)
        wait, holder = book.head_wait(now)
        stats.head_wait_s, stats.head_holder = round(wait, 3), holder
        if self.cursor is not None:  # where the training loop stands, not how far the intake has read
            stats.train_k = book.k_of(self.cursor.position)
        if meta.epoch_rows and stats.train_k is not None:
            rows = stats.train_k * meta.rows_per_message
            stats.epoch, stats.epoch_rows_done = divmod(rows, meta.epoch_rows)
            stats.epoch_rows = meta.epoch_rows
        for peer in book.peers.values():
            row = stats.producers.get(peer.name)
            if row is not None:
                row.orders_outstanding += len(peer.outstanding)
                row.orders_delivered += peer.delivered
                row.orders_reassigned += peer.reassigned
        for name, (delivered, reassigned) in book.retired.items():
            row = stats.producers.get(name)
            if row is not None:
                row.orders_delivered += delivered
                row.orders_reassigned += reassigned
