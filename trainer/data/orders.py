"""The trainer's side of the schedule (docs/SPEC.md §2.8, docs/PROTOCOL.md §6): who computes which message.

Message k of the train split is a pure function of the stream and k, so the trainer decides the
order and producers are stateless workers. :class:`OrderBook` (used by the consumer's receive
thread only) keeps:

- the **cursor**: this rank's next message to train on. Rank r of W trains on the train messages
  ``k = r + j*W`` for j = 0, 1, 2, ... (one process: every k); ``j`` is the rank's *position*;
- the **producers** it knows (a producer becomes known by a meta message of the pinned stream,
  and is forgotten after :attr:`OrderSettings.silence_s` without any message), each with a
  **credit**: at most :attr:`OrderSettings.credit` messages ordered and not yet delivered;
- the **orders**: each message ordered from one producer; one not delivered within
  :attr:`OrderSettings.reassign_s` (or whose producer fell silent) is ordered again from another
  producer. The first delivery from a producer it was ordered from wins; any other delivery is
  dropped and counted (``duplicate``, or ``unordered`` when it was never ordered from that peer);
- the **reorder buffer**: delivered train messages wait here until every earlier position has
  arrived, so the training loop sees them strictly in k order. Nothing is ordered more than
  :attr:`OrderSettings.ahead` positions beyond the head, which bounds the buffer.

The val set is ordered first (every val index once, from any producer), then the train stream.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from shared import settings
from shared.settings import setting
from shared.wire import WireMessage

MAX_PEERS = 256  # producers the trainer keeps orders for; later ones are ignored (counted) until one leaves
MAX_RECENT_EVENTS = 64


@dataclass(frozen=True)
class OrderSettings:
    """How the trainer hands out work (``python -m trainer``'s ``stream`` flags)."""

    credit: int = setting(8, "messages ordered from one producer and not yet delivered, at most", metavar="N",
                          check=settings.at_least(1))
    ahead: int = setting(64, "train messages ordered beyond the oldest one not yet received, at most (bounds the "
                             "reorder buffer)", metavar="N", check=settings.at_least(1))
    reassign_s: float = setting(10.0, "an order not delivered within this many seconds is given to another producer",
                                metavar="S", check=settings.at_least(0.1))
    silence_s: float = setting(6.0, "a producer silent this long (it sends a meta message every 2 s) is forgotten and "
                                    "its orders are given to others", metavar="S", check=settings.at_least(0.1))

    def __post_init__(self) -> None:
        settings.check_fields(self)


@dataclass(frozen=True)
class Cursor:
    """A rank's place in the train schedule: its next ``position`` (the j of ``k = rank + j*world``)
    and how many rows of that message the training loop already used (a batch may end inside a
    message). ``world`` is the number of ranks it was taken under."""

    position: int = 0
    rows_used: int = 0
    world: int = 1

    def to_dict(self) -> dict[str, int]:
        return {"position": self.position, "rows_used": self.rows_used, "world": self.world}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> Cursor:
        return cls(int(data["position"]), int(data["rows_used"]), int(data["world"]))

    def for_world(self, world: int, rank: int) -> Cursor:
        """This cursor for ``rank`` of ``world`` ranks. The same world: unchanged. Another: the
        rank starts at the first global k that no rank of the old world had begun (the rows
        left in messages the old ranks had begun are skipped: nothing is trained twice)."""
        if world == self.world:
            return self
        first_free = self.position * self.world + (self.world if self.rows_used else 0)
        return Cursor(position=max(0, -(-(first_free - rank) // world)), rows_used=0, world=world)


@dataclass
class Peer:
    """A producer connection the trainer orders from (keyed by its ZeroMQ routing id)."""

    name: str  # its producer id, for people
    last_heard: float
    outstanding: dict[tuple[str, int], float] = field(default_factory=dict)  # (split, index) -> when ordered
    ordered: int = 0
    delivered: int = 0
    reassigned: int = 0  # orders of this peer given to another producer
    duplicates: int = 0
    unordered: int = 0


@dataclass
class OrderCounts:
    """Totals over every producer, including those forgotten."""

    ordered: int = 0
    delivered: int = 0
    reassigned: int = 0
    duplicates: int = 0
    unordered: int = 0
    ignored_peers: int = 0  # meta messages of producers beyond MAX_PEERS
    forgotten_peers: int = 0


class OrderBook:
    """See the module docstring. ``rank`` / ``world``: this rank's share of the train schedule."""

    def __init__(self, order_settings: OrderSettings, rows_per_message: int, val_messages: int,
                 rank: int = 0, world: int = 1) -> None:
        self.settings = order_settings
        self.rows_per_message = rows_per_message
        self.rank, self.world = rank, world
        self.peers: dict[bytes, Peer] = {}
        self.counts = OrderCounts()
        self.train_started = False
        self.head = 0  # the position of the next train message to hand to the assembler
        self.skip_rows = 0  # rows of the head message already used (a resumed cursor)
        self._next_position = 0  # the next position never ordered
        self._val_unordered = collections.deque(range(val_messages))
        self._val_missing = set(range(val_messages))
        self._holders: dict[tuple[str, int], set[bytes]] = {}  # outstanding order -> the peers it was ordered from
        self._again: collections.deque[tuple[str, int]] = collections.deque()  # orders to give to another producer
        self.buffer: dict[int, WireMessage] = {}  # position -> delivered train message, waiting for the head
        self.retired: dict[str, tuple[int, int]] = {}  # producer name -> (delivered, reassigned) of forgotten connections

    # ---- the schedule ------------------------------------------------------------------

    def k_of(self, position: int) -> int:
        """The global train index of this rank's ``position``."""
        return self.rank + position * self.world

    def start_train(self, cursor: Cursor) -> None:
        """Starts ordering train messages at ``cursor`` (once; before it, only the val set is ordered)."""
        if self.train_started:
            raise RuntimeError("the train schedule has already started")
        self.train_started = True
        self.head = self._next_position = cursor.position
        self.skip_rows = cursor.rows_used

    # ---- producers ---------------------------------------------------------------------

    def hello(self, peer: bytes, name: str, now: float) -> None:
        """A meta message of the pinned stream from ``peer``: it can take orders."""
        known = self.peers.get(peer)
        if known is not None:
            known.last_heard = now
        elif len(self.peers) < MAX_PEERS:
            self.peers[peer] = Peer(name, now)
        else:
            self.counts.ignored_peers += 1

    def heard(self, peer: bytes, now: float) -> None:
        known = self.peers.get(peer)
        if known is not None:
            known.last_heard = now

    # ---- deliveries --------------------------------------------------------------------

    def deliver(self, peer: bytes, split: str, index: int) -> str | None:
        """Takes a delivery of message ``index`` of ``split`` from ``peer``: None if it is to be
        used, else why it is dropped: ``duplicate`` (it was delivered already, by this producer
        or another) or ``unordered`` (never ordered from this producer). Train indices are global k."""
        key = (split, index if split == "val" else self._position_of(index))
        state = self.peers.get(peer)
        ordered_here = state is not None and state.outstanding.pop(key, None) is not None
        if self._have(key):
            if state is not None:
                state.duplicates += 1
            self.counts.duplicates += 1
            return "duplicate"
        if not ordered_here:
            if state is not None:
                state.unordered += 1
            self.counts.unordered += 1
            return "unordered"
        self._holders.pop(key, None)
        state.delivered += 1
        self.counts.delivered += 1
        return None

    def _have(self, key: tuple[str, int]) -> bool:
        split, index = key
        if split == "val":
            return index not in self._val_missing
        return 0 <= index < self.head or index in self.buffer

    def _position_of(self, k: int) -> int:
        position, rest = divmod(k - self.rank, self.world)
        return position if rest == 0 and position >= 0 else -1

    def val_received(self, index: int) -> None:
        self._val_missing.discard(index)
        self._holders.pop(("val", index), None)

    def buffer_train(self, message: WireMessage) -> None:
        self.buffer[self._position_of(message.index)] = message

    def pop_head(self) -> WireMessage | None:
        """The head train message when it has arrived (the head then moves on), else None."""
        message = self.buffer.pop(self.head, None)
        if message is not None:
            self.head += 1
        return message

    # ---- handing out work --------------------------------------------------------------

    def expire(self, now: float) -> list[tuple[bytes, str, int]]:
        """Forgets silent producers and queues their orders, and orders overdue, for another
        producer. An overdue order of the only producer there is goes to it again (it may have
        lost it; a late first copy then arrives as a duplicate): returned as ``(peer, split, index)``."""
        again: list[tuple[bytes, str, int]] = []
        for peer_id, peer in list(self.peers.items()):
            if now - peer.last_heard > self.settings.silence_s:
                del self.peers[peer_id]
                self.counts.forgotten_peers += 1
                self._retire(peer)
                for key in peer.outstanding:
                    self._release(key, peer_id, peer)
                continue
            for key, ordered_at in list(peer.outstanding.items()):
                if now - ordered_at <= self.settings.reassign_s:
                    continue
                if key not in self._holders:  # another producer delivered it: this copy is not awaited
                    del peer.outstanding[key]
                elif len(self.peers) == 1:
                    peer.outstanding[key] = now
                    peer.reassigned += 1
                    self.counts.reassigned += 1
                    split, index = key
                    again.append((peer_id, split, index if split == "val" else self.k_of(index)))
                elif key not in self._again:
                    peer.reassigned += 1
                    self.counts.reassigned += 1
                    self._again.append(key)
        return again

    def _retire(self, peer: Peer) -> None:
        """Keeps a forgotten connection's totals under its producer name (a bounded table)."""
        delivered, reassigned = self.retired.pop(peer.name, (0, 0))
        if len(self.retired) >= MAX_PEERS:
            del self.retired[next(iter(self.retired))]
        self.retired[peer.name] = (delivered + peer.delivered, reassigned + peer.reassigned)

    def _release(self, key: tuple[str, int], peer_id: bytes, peer: Peer) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        holders.discard(peer_id)
        if not holders and key not in self._again:
            peer.reassigned += 1
            self.counts.reassigned += 1
            self._again.append(key)

    def issue(self, now: float) -> list[tuple[bytes, str, int]]:
        """New orders, as ``(peer, split, index)`` (train: the global k), for every producer with
        credit left: reassignments first, then val indices never ordered, then train positions up
        to :attr:`OrderSettings.ahead` beyond the head (what bounds the reorder buffer and, since a
        delivered message is assembled only while the ready queue has room, all that waits)."""
        orders: list[tuple[bytes, str, int]] = []
        for peer_id, peer in sorted(self.peers.items(), key=lambda item: len(item[1].outstanding)):
            while len(peer.outstanding) < self.settings.credit:
                key = self._next_order(peer)
                if key is None:
                    break
                peer.outstanding[key] = now
                peer.ordered += 1
                self.counts.ordered += 1
                self._holders.setdefault(key, set()).add(peer_id)
                split, index = key
                orders.append((peer_id, split, index if split == "val" else self.k_of(index)))
        return orders

    def _next_order(self, peer: Peer) -> tuple[str, int] | None:
        for _ in range(len(self._again)):
            key = self._again.popleft()
            if key not in self._holders:
                continue  # delivered meanwhile
            if key in peer.outstanding:
                self._again.append(key)  # this peer has it already: for another one
                continue
            return key
        if self._val_unordered:
            return "val", self._val_unordered.popleft()
        if self.train_started and self._next_position < self.head + self.settings.ahead:
            self._next_position += 1
            return "train", self._next_position - 1
        return None

    # ---- for the diagnostics -----------------------------------------------------------

    def head_wait(self, now: float) -> tuple[float, str | None]:
        """How long the head train message has been ordered and not delivered, and from whom
        (0, None when it is not outstanding)."""
        key = ("train", self.head)
        for peer in self.peers.values():
            ordered_at = peer.outstanding.get(key)
            if ordered_at is not None and key in self._holders:
                return now - ordered_at, peer.name
        return 0.0, None

    @property
    def outstanding(self) -> int:
        return len(self._holders)
