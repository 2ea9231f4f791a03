"""Stream accounting as typed numbers: what the consumer counts, declared once.

:class:`StreamStats` is made by ``DatasetConsumer.stats()`` and read as it is by the
diagnostics schema (``GET /diagnostics`` ``stream``), the Prometheus exporter and the
data-parallel merge. The metadata of each numeric field says how it merges over ranks
(``merge``: sum, min, max, any) and how it is exported to Prometheus (its family, label and
kind, see :func:`_number`), so adding a counter here adds it everywhere.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _number(default: Any, merge: str, help: str, metric: str | None = None, label: str | None = None,
            kind: str = "counter") -> Any:
    """A numeric field: how it merges over ranks, and the Prometheus family ``linepack_stream_<metric>``
    (of ``kind`` counter or gauge) it is exported in, as the sample ``kind=<label>`` when given."""
    return field(default=default, metadata={"merge": merge, "help": help, "metric": metric, "label": label, "kind": kind})


@dataclass
class ProducerRow:
    """One producer's message accounting (``trainer.data.accounting.ProducerTable``)."""

    messages: int  # messages whose header named this producer: meta, train and val accepted, and rejected
    meta: int
    train: int
    val: int
    first_seq: int
    last_seq: int
    gaps: int  # sequence numbers between first_seq and last_seq (of this incarnation) that never arrived
    duplicates: int
    out_of_order: int
    seq_anomalies: int = 0  # sequence numbers implausibly far from the window: ignored, counted
    rejected: int = 0  # its messages that were rejected after their header was read (counted in messages, not gaps)
    restarts: int = 0  # new incarnations seen: the producer process restarted with the same id
    incarnation: str = ""
    consumed: int = 0  # train messages whose rows went into handed-out batches
    seconds_since_last: float = 0.0
    orders_outstanding: int = 0  # messages ordered from it and not yet delivered
    orders_delivered: int = 0
    orders_reassigned: int = 0  # its orders given to another producer (it was slow or fell silent)


@dataclass
class StreamStats:
    """One consumer's stream accounting (docs/SPEC.md §6 ``stream``), or, merged, their totals.

    Under data-parallel training rank 0's merged numbers also carry ``ranks`` (each rank's own,
    as of step ``as_of_step``; None: read live at this request).
    """

    received: int = _number(0, "sum", "messages received", "messages", "received")
    accepted: int = _number(0, "sum", "messages accepted", "messages", "accepted")
    rejected_total: int = _number(0, "sum", "messages rejected", "messages", "rejected")
    awaiting_meta: int = _number(0, "sum", "batches dropped because their meta message had not arrived yet", "messages",
                                 "awaiting_meta")
    consumed_messages: int = _number(0, "sum", "train messages consumed by the training loop", "messages", "consumed")
    orders_issued: int = _number(0, "sum", "messages ordered from producers", "orders", "issued")
    orders_delivered: int = _number(0, "sum", "ordered messages delivered (the first copy)", "orders", "delivered")
    orders_reassigned: int = _number(0, "sum", "orders given to another producer (not delivered in time, or the producer "
                                               "fell silent)", "orders", "reassigned")
    orders_duplicate: int = _number(0, "sum", "valid messages delivered after another producer had delivered them: dropped",
                                    "orders", "duplicate")
    orders_unordered: int = _number(0, "sum", "valid messages never ordered from their sender: dropped", "orders", "unordered")
    orders_outstanding: int = _number(0, "sum", "messages ordered and not yet delivered", "orders_outstanding", kind="gauge")
    reorder_depth: int = _number(0, "sum", "train messages received ahead of the next one needed (the reorder buffer)",
                                 "reorder_depth", kind="gauge")
    head_wait_s: float = _number(0.0, "max", "seconds the next train message needed has been ordered and not delivered",
                                 "head_wait_seconds", kind="gauge")
    head_holder: str | None = None  # the producer the next train message is ordered from, while it is late
    train_k: int | None = _number(None, "min", "the next train message index k of the schedule (the cursor)", "cursor_k",
                                  kind="gauge")
    epoch: int | None = _number(None, "min", "the epoch of the next train message (epoch sampling)", "epoch", kind="gauge")
    epoch_rows_done: int | None = None  # rows of the current epoch that the training loop has taken (epoch sampling)
    epoch_rows: int | None = None  # rows in one epoch (epoch sampling)
    consumed_batches: int = _number(0, "sum", "batches handed to the training loop", "consumed_batches")
    gaps: int = _number(0, "sum", "lost messages (sequence gaps), over every producer", "sequence_errors", "gaps")
    duplicates: int = _number(0, "sum", "duplicate sequence numbers, over every producer", "sequence_errors", "duplicates")
    out_of_order: int = _number(0, "sum", "late messages that filled a gap, over every producer", "sequence_errors", "out_of_order")
    seq_anomalies: int = _number(0, "sum", "sequence numbers implausibly far from their producer's window", "sequence_errors",
                                 "seq_anomalies")
    restarts: int = _number(0, "sum", "producer restarts (new incarnations of a known id)", "producer_restarts")
    curve_accepted: int = _number(0, "sum", "CurveZMQ handshakes accepted (listed keys)", "curve_handshakes", "accepted")
    curve_refused: int = _number(0, "sum", "CurveZMQ handshakes refused (unlisted keys): none of their messages got in",
                                 "curve_handshakes", "refused")
    queue_depth: int = _number(0, "sum", "assembled batches waiting for the training loop", "queue_depth", kind="gauge")
    starved: bool = _number(False, "any", "1 while the consumer waits for producers", "starved", kind="gauge")
    seconds_since_last_message: float | None = _number(None, "max", "seconds since the last message",
                                                       "seconds_since_last_message", kind="gauge")
    val_messages_seen: int = _number(0, "min", "val messages received (distinct val_index)")
    val_messages_total: int | None = None
    meta_digest: str | None = None
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    rows_by_source: dict[str, int] = field(default_factory=dict)  # a mixture's train rows handed to the training loop, by source
    rejected_by_producer: dict[str, dict[str, int]] = field(default_factory=dict)  # reasons of rejects whose header named a producer
    producers: dict[str, ProducerRow] = field(default_factory=dict)
    data_wait_fraction: float | None = None  # share of step time the training loop waited (set by the diagnostics)
    rank: int | None = None
    endpoint: str | None = None
    as_of_step: int | None = None
    ranks: list[StreamStats] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamStats:
        """The inverse of :meth:`to_dict` (the data-parallel gather sends stats as JSON)."""
        data = dict(data)
        data["producers"] = {name: ProducerRow(**row) for name, row in data.get("producers", {}).items()}
        if data.get("ranks") is not None:
            data["ranks"] = [cls.from_dict(entry) for entry in data["ranks"]]
        return cls(**data)


def merged_fields() -> list[dataclasses.Field]:
    """The numeric fields of :class:`StreamStats`, each with its ``merge`` rule."""
    return [f for f in dataclasses.fields(StreamStats) if "merge" in f.metadata]


def merge_stream_stats(per_rank: list[StreamStats]) -> StreamStats:
    """One :class:`StreamStats` for several ranks, with ``ranks`` = the inputs in rank order.

    Numbers merge by their field's rule: counts are summed; ``starved`` is any rank's;
    ``seconds_since_last_message`` is the most silent rank's (one starved rank stalls every
    rank) and None while any rank has received nothing; ``val_messages_seen`` is the smallest
    (the set is complete when it is complete everywhere). Producer rows keep their ids; an id
    seen by several ranks gets ``@rankN``.
    """
    total = StreamStats(val_messages_total=per_rank[0].val_messages_total, meta_digest=per_rank[0].meta_digest)
    for f in merged_fields():
        values = [getattr(stats, f.name) for stats in per_rank]
        rule = f.metadata["merge"]
        if rule == "sum":
            merged: Any = sum(values)
        elif rule == "any":
            merged = any(values)
        elif rule == "min":
            merged = None if None in values else min(values)
        else:  # max, with None ("not yet") winning
            merged = None if None in values else max(values)
        setattr(total, f.name, merged)
    rejected: collections.Counter[str] = collections.Counter()
    rows_by_source: collections.Counter[str] = collections.Counter()
    by_producer: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for stats in per_rank:
        rejected.update(stats.rejected)
        rows_by_source.update(stats.rows_by_source)
        for producer, reasons in stats.rejected_by_producer.items():
            by_producer[producer].update(reasons)
    total.rejected = dict(rejected)
    total.rows_by_source = dict(rows_by_source)
    total.rejected_by_producer = {producer: dict(reasons) for producer, reasons in by_producer.items()}
    owners = collections.Counter(producer for stats in per_rank for producer in stats.producers)
    total.producers = {
        (producer if owners[producer] == 1 else f"{producer}@rank{stats.rank}"): row
        for stats in per_rank for producer, row in stats.producers.items()
    }
    total.ranks = sorted(per_rank, key=lambda stats: stats.rank or 0)
    return total
