"""Per-producer sequence accounting and rejection counts (docs/SPEC.md §4, docs/PROTOCOL.md §6).

Used by the consumer's receive thread; the consumer holds the lock around every call.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from trainer.data.stats import ProducerRow


@dataclass
class _ProducerState:
    first_seq: int
    last_seq: int
    last_seen: float
    messages: int = 0
    train: int = 0
    val: int = 0
    gaps: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    consumed: int = 0
    dropped: int = 0
    missing: set[int] = field(default_factory=set)


class ProducerTable:
    """Sequence accounting per producer id.

    ``gaps`` counts sequence numbers between a producer's first and last seen message
    that never arrived; a late arrival fills its gap again and counts as ``out_of_order``;
    a number seen twice counts as a ``duplicate``. The first message seen from a producer
    starts its count (a trainer that joins late has not lost the earlier messages).
    Only the newest :attr:`WINDOW` numbers are remembered as fillable.
    """

    WINDOW = 1 << 16

    def __init__(self) -> None:
        self._states: dict[str, _ProducerState] = {}

    def record(self, producer_id: str, seq: int, split: str, now: float) -> None:
        state = self._states.get(producer_id)
        if state is None:
            state = self._states[producer_id] = _ProducerState(first_seq=seq, last_seq=seq, last_seen=now)
        elif seq > state.last_seq:
            state.gaps += seq - state.last_seq - 1
            state.missing.update(range(max(state.last_seq + 1, seq - self.WINDOW), seq))
            state.last_seq = seq
        elif seq < state.first_seq:
            state.gaps += state.first_seq - seq - 1
            state.missing.update(range(max(seq + 1, state.first_seq - self.WINDOW), state.first_seq))
            state.first_seq = seq
            state.out_of_order += 1
        elif seq in state.missing:
            state.missing.discard(seq)
            state.gaps -= 1
            state.out_of_order += 1
        else:
            state.duplicates += 1
        if len(state.missing) > self.WINDOW:
            state.missing = {s for s in state.missing if s > state.last_seq - self.WINDOW}
        state.messages += 1
        state.last_seen = now
        if split == "val":
            state.val += 1
        else:
            state.train += 1

    def count_consumed(self, producer_id: str) -> None:
        """One more train message of a recorded producer went into a handed-out batch."""
        self._states[producer_id].consumed += 1

    def count_dropped(self, producer_id: str) -> None:
        """One more train message of a recorded producer was read past (see ``wait_for_val_set``)."""
        self._states[producer_id].dropped += 1

    def total(self, name: str) -> int:
        return sum(getattr(state, name) for state in self._states.values())

    def rows(self, now: float) -> dict[str, ProducerRow]:
        return {
            producer_id: ProducerRow(
                messages=s.messages, train=s.train, val=s.val, first_seq=s.first_seq, last_seq=s.last_seq,
                gaps=s.gaps, duplicates=s.duplicates, out_of_order=s.out_of_order, consumed=s.consumed,
                dropped=s.dropped, seconds_since_last=round(now - s.last_seen, 3),
            )
            for producer_id, s in self._states.items()
        }


class Rejections:
    """Rejected messages counted by reason, and by reason per producer where the header named one."""

    def __init__(self) -> None:
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.by_producer: dict[str, collections.Counter[str]] = {}

    def count(self, reason: str, producer_id: str | None) -> int:
        """Counts one reject; returns how many of this reason there are now."""
        self.by_reason[reason] += 1
        if producer_id is not None:
            self.by_producer.setdefault(producer_id, collections.Counter())[reason] += 1
        return self.by_reason[reason]

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())
