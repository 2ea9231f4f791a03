"""Serving a stream to trainers over ZeroMQ, shared by ``producer run`` and ``producer replay``.

A producer is a worker: it computes the messages a trainer orders and sends nothing else
(docs/PROTOCOL.md §2, §6). :class:`Link` is one DEALER socket to one trainer endpoint (one per
data-parallel rank): data messages go out on it and the trainer's orders (and refusals) come
back on it. :class:`Worker` serves the orders of every link from a :class:`MessageSource` (the
live :class:`~producer.stream.BatchStream`, or a recording), announces the stream with a meta
message on every link before its first batch and every ``meta_every`` seconds (the trainer's
sign that the producer is alive), says so when no trainer has ordered anything for a while, and
passes on a trainer's refusal to the log. :class:`Throughput` counts what was sent and prints a
status line; :class:`StopSignal` turns SIGTERM/SIGINT into a flag. :class:`SenderSettings` are the
transport flags both commands take.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import zmq

from shared import settings
from shared.curve import CurveClient, configure_client
from shared.endpoints import check_endpoints
from shared.limits import MAX_PRODUCER_ID_CHARS
from shared.meta import StreamMeta
from shared.settings import above, setting
from shared.wire import Order, Refusal, WireError, decode_control, encode, encode_meta, new_incarnation

SEND_HWM = 16  # messages queued per link before send blocks (orders bound what is in flight; this is a backstop)
LINGER_MS = 500  # how long close() may still flush queued messages
# A ROUTER drops what a peer that disconnected had queued and it had not yet read: a producer that
# stops keeps its connections this long after its last message, so the trainer reads what it sent.
DRAIN_S = 0.5
POLL_MS = 100  # a blocked send or an idle worker wakes this often to notice a stop request
MAX_PENDING_ORDERS = 4096  # ordered messages kept per link; a trainer never grants this many (a hostile one is cut off)
NO_ORDERS_WARNING_S = 10.0  # after this long without an order, the worker says that nothing is ordering


@dataclass(frozen=True)
class SenderSettings:
    """Where a producer sends: ``connect`` (the default topology; several endpoints for the ranks
    of a data-parallel trainer) or ``bind``, exactly one; and the optional CurveZMQ keys."""

    connect: tuple[str, ...] = setting((), "trainer endpoints to connect to, e.g. tcp://trainer:5555; repeat it (or separate "
                                           "with commas) for the ranks of a data-parallel trainer: each rank orders the "
                                           "messages it trains on", metavar="ADDR", many=True, check=check_endpoints)
    bind: str | None = setting(None, "bind here instead; trainers connect (e.g. tcp://*:5555)", metavar="ADDR",
                               check=check_endpoints)
    status_every: float = setting(30.0, "seconds between status lines on stderr", metavar="S", check=above(0))
    curve_secret_key: str | None = setting(None, "CurveZMQ: this producer's NAME.key_secret file (with --curve-server-key; "
                                                 "docs/SECURITY.md)", metavar="FILE")
    curve_server_key: str | None = setting(None, "CurveZMQ: the trainer's public NAME.key file", metavar="FILE")

    def __post_init__(self) -> None:
        settings.check_fields(self)
        if bool(self.connect) == (self.bind is not None):
            raise ValueError("give exactly one of --connect ADDR and --bind ADDR")
        if (self.curve_secret_key is None) != (self.curve_server_key is None):
            raise ValueError("--curve-secret-key and --curve-server-key go together")

    def curve(self) -> CurveClient | None:
        """The Curve keys, read from their files; None when Curve is off. Raises CurveKeyError."""
        if self.curve_secret_key is None:
            return None
        return CurveClient.from_files(self.curve_secret_key, self.curve_server_key)


def unique_producer_id() -> str:
    """``hostname-pid-8 random hex digits``: distinct for every process, even in one container image."""
    suffix = f"-{os.getpid()}-{secrets.token_hex(4)}"
    return socket.gethostname()[: MAX_PRODUCER_ID_CHARS - len(suffix)] + suffix


class StopSignal:
    """Set by SIGTERM or SIGINT (handlers installed by the constructor, main thread only)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._event.set())

    def is_set(self) -> bool:
        return self._event.is_set()


class Link:
    """One DEALER socket to one trainer endpoint: batches and metas out, orders and refusals in.

    :meth:`send` blocks while the socket's queue is full, but wakes every :data:`POLL_MS` to give
    up when ``stop`` is set; ``blocked_s`` accumulates the time spent waiting. Orders of one
    trainer wait in :attr:`pending` (a trainer process that restarted has a new incarnation: the
    orders of the old one are void and dropped).
    """

    def __init__(self, connect: str | None, bind: str | None, stop: StopSignal, curve: CurveClient | None = None) -> None:
        self.stop = stop
        self.blocked_s = 0.0
        self.pending: collections.deque[tuple[str, int]] = collections.deque()
        self.trainer: str | None = None  # the incarnation of the trainer whose orders are pending
        self.orders = 0  # orders received
        self.refusal: Refusal | None = None  # the latest refusal, until the next order
        self._context = zmq.Context()
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        try:
            if curve is not None:
                configure_client(self.socket, curve)
            if bind is not None:
                self.socket.bind(bind)
                self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self.socket.connect(connect)
                self.endpoint = connect
        except zmq.ZMQError:
            self.socket.close(linger=0)
            self._context.term()
            raise

    def send(self, frames: list[Any], while_blocked: Callable[[], None] = lambda: None) -> bool:
        """Sends one message; False if a stop was requested before it could be sent.
        ``while_blocked`` is called after every :data:`POLL_MS` spent waiting."""
        while True:
            try:
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            if self.stop.is_set():
                return False
            started = time.monotonic()
            self.socket.poll(POLL_MS, zmq.POLLOUT)
            self.blocked_s += time.monotonic() - started
            while_blocked()

    def read_control(self) -> list[str]:
        """Takes every waiting control message; returns what is worth a log line (refusals, bad
        control messages). Orders go to :attr:`pending`."""
        notes = []
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return notes
            try:
                control = decode_control(frames)
            except WireError as error:
                notes.append(f"ignored a control message from {self.endpoint} ({error})")
                continue
            if isinstance(control, Refusal):
                self.refusal = control
                notes.append(f"the trainer at {self.endpoint} refuses this producer's messages ({control.reason}): "
                             f"{control.detail}")
                continue
            self._take(control)

    def _take(self, order: Order) -> None:
        if order.trainer != self.trainer:
            self.pending.clear()
            self.trainer = order.trainer
        self.orders += 1
        self.refusal = None
        room = MAX_PENDING_ORDERS - len(self.pending)
        self.pending.extend((order.split, index) for index in range(order.start, order.start + min(order.count, room)))

    def close(self) -> None:
        """Closes the socket; queued messages get at most :data:`LINGER_MS` to leave."""
        self.close_socket()
        self._context.term()

    def close_socket(self) -> None:
        """Starts the linger without waiting for it (``close`` = this + waiting)."""
        self.socket.close(linger=LINGER_MS)


def route_producer_id(producer_id: str, index: int) -> str:
    """The wire producer id of endpoint ``index``: ``ID/index``, ``ID`` cut to fit the limit."""
    suffix = f"/{index}"
    return producer_id[: MAX_PRODUCER_ID_CHARS - len(suffix)] + suffix


class MessageSource(Protocol):
    """What a worker serves: the stream's meta and any message of it by split and index."""

    meta: StreamMeta

    def message(self, split: str, index: int) -> dict[str, np.ndarray] | None:
        """The tensors of message ``index`` of ``split``; None when this source does not hold it."""
        ...


class Worker:
    """Serves the orders of every link from ``source`` until stopped (docs/PROTOCOL.md §6).

    Links are served in turn, one message at a time, each in the order its trainer asked. Each
    link has its own sequence numbers 0, 1, 2, ... (meta messages included) and, when there are
    several, its own wire producer id (:func:`route_producer_id`). ``incarnation`` is this run's
    random id: a restarted producer with the same id starts a new sequence.
    """

    def __init__(self, links: list[Link], source: MessageSource, producer_id: str, throughput: Throughput,
                 meta_every: float = 2.0, incarnation: str | None = None) -> None:
        self.links = links
        self.source = source
        self.throughput = throughput
        self.producer_ids = [producer_id] if len(links) == 1 else [route_producer_id(producer_id, i) for i in range(len(links))]
        self.sent = [{"meta": 0, "train": 0, "val": 0} for _ in links]  # messages handed to ZeroMQ per link
        self.unavailable = 0  # ordered messages the source does not hold (a recording's end)
        self.meta_every = meta_every
        self.incarnation = incarnation or new_incarnation()
        self._meta_sent_at = [float("-inf")] * len(links)
        self._next_link = 0
        self._last_order_at = time.monotonic()
        self._last_sent_at = float("-inf")
        self._idle_warned = False
        self._poller = zmq.Poller()
        for link in links:
            self._poller.register(link.socket, zmq.POLLIN)

    @property
    def blocked_s(self) -> float:
        return sum(link.blocked_s for link in self.links)

    def serve(self, stop: StopSignal, max_messages: int | None = None,
              on_unavailable: Callable[[str, int], bool] = lambda split, index: True) -> None:
        """Serves orders until ``stop`` is set or ``max_messages`` batches were sent.
        ``on_unavailable(split, index)`` hears of an ordered message the source does not hold and
        returns False to stop serving (the default goes on: the trainer reassigns the order)."""
        while not stop.is_set() and (max_messages is None or self.batches_sent < max_messages):
            if not self._send_due_metas():
                return
            busy = any(link.pending for link in self.links)
            if self._poller.poll(0 if busy else POLL_MS):
                self._read_control()
            self.throughput.tick()
            served = self._serve_one(on_unavailable)
            if served is None:
                return
            if not served:
                self._warn_if_idle()

    @property
    def batches_sent(self) -> int:
        return sum(sent["train"] + sent["val"] for sent in self.sent)

    def _read_control(self) -> None:
        for link in self.links:
            before = link.orders
            for note in link.read_control():
                print(f"producer {self.producer_ids[0]}: {note}", file=sys.stderr, flush=True)
            if link.orders != before:
                self._last_order_at = time.monotonic()
                self._idle_warned = False

    def _warn_if_idle(self) -> None:
        idle = time.monotonic() - self._last_order_at
        if idle > NO_ORDERS_WARNING_S and not self._idle_warned:
            self._idle_warned = True
            refused = [link for link in self.links if link.refusal is not None]
            why = (f"refused by {', '.join(link.endpoint for link in refused)}" if refused else
                   "is a trainer running and listening there?")
            print(f"producer {self.producer_ids[0]}: no trainer has ordered a message for {idle:.0f} s on "
                  f"{', '.join(link.endpoint for link in self.links)} ({why}); nothing is being sent", file=sys.stderr, flush=True)

    def _serve_one(self, on_unavailable: Callable[[str, int], bool]) -> bool | None:
        """Sends the next ordered message of the next link that has one: True if one was sent,
        False if none was ordered, None to stop (a stop request, or ``on_unavailable`` said so)."""
        for turn in range(len(self.links)):
            index = (self._next_link + turn) % len(self.links)
            link = self.links[index]
            if not link.pending:
                continue
            self._next_link = (index + 1) % len(self.links)
            split, message_index = link.pending.popleft()
            tensors = self.source.message(split, message_index)
            if tensors is None:
                self.unavailable += 1
                return True if on_unavailable(split, message_index) else None
            frames = encode(self.source.meta, split, self.producer_ids[index], self._seq(index), tensors, message_index,
                            incarnation=self.incarnation)
            if not link.send(frames, while_blocked=self.throughput.tick):
                return None
            self.sent[index][split] += 1
            self._last_sent_at = time.monotonic()
            self.throughput.add(split, int(np.count_nonzero(tensors["attention_mask"])),
                                sum(array.nbytes for array in tensors.values()))
            return True
        return False

    def _seq(self, index: int) -> int:
        return sum(self.sent[index].values())

    def _send_due_metas(self) -> bool:
        now = time.monotonic()
        for index, link in enumerate(self.links):
            if now - self._meta_sent_at[index] < self.meta_every:
                continue
            frames = encode_meta(self.source.meta, self.producer_ids[index], self._seq(index), incarnation=self.incarnation)
            if not link.send(frames, while_blocked=self.throughput.tick):
                return False
            self.sent[index]["meta"] += 1
            self._meta_sent_at[index] = now
            self.throughput.add("meta", 0, len(frames[1]))
        return True

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"endpoint": link.endpoint, "producer_id": producer_id, "orders": link.orders, "pending": len(link.pending),
             "refused": None if link.refusal is None else f"{link.refusal.reason}: {link.refusal.detail}", **sent}
            for link, producer_id, sent in zip(self.links, self.producer_ids, self.sent)
        ]

    def close(self) -> None:
        """Closes every link, :data:`DRAIN_S` after the last message was sent (see there); their
        lingers run at the same time, so the whole takes at most that plus :data:`LINGER_MS`."""
        remaining = self._last_sent_at + DRAIN_S - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        for link in self.links:
            link.close_socket()
        for link in self.links:
            link.close()


def open_links(transport: SenderSettings, stop: StopSignal) -> list[Link]:
    """One :class:`Link` per ``--connect`` endpoint (or the one ``--bind``); raises zmq.ZMQError
    (every link opened so far closed) for a malformed endpoint or a port in use."""
    curve = transport.curve()
    places = [(None, transport.bind)] if transport.bind is not None else [(endpoint, None) for endpoint in transport.connect]
    links: list[Link] = []
    try:
        for connect, bind in places:
            links.append(Link(connect, bind, stop, curve=curve))
    except zmq.ZMQError as error:
        for link in links:
            link.close()
        raise zmq.ZMQError(error.errno, f"cannot {'bind' if bind else 'connect'} {bind or connect}: {error}") from None
    return links


class Throughput:
    """Counts what was handed to ZeroMQ (not what a trainer received: the trainer's orders say
    that); prints a status line to stderr every ``status_every`` seconds."""

    def __init__(self, name: str, links: list[Link], status_every: float) -> None:
        self.name = name
        self.links = links
        self.status_every = status_every
        self.messages = 0
        self.tokens = 0
        self.payload_bytes = 0
        self.by_split: dict[str, int] = {}
        self._started = self._last_time = time.monotonic()
        self._last = (0, 0, 0, 0.0)

    def add(self, split: str, tokens: int, payload_bytes: int) -> None:
        """One message sent: its split, visible tokens (0 if unknown) and tensor bytes."""
        self.messages += 1
        self.by_split[split] = self.by_split.get(split, 0) + 1
        self.tokens += tokens
        self.payload_bytes += payload_bytes
        self.tick()

    @property
    def blocked_s(self) -> float:
        return sum(link.blocked_s for link in self.links)

    def tick(self) -> None:
        """Prints the status line if it is due (also called while a send is blocked)."""
        now = time.monotonic()
        if now - self._last_time < self.status_every:
            return
        messages, tokens, payload, blocked = self._last
        elapsed = now - self._last_time
        tokens_rate = f"{(self.tokens - tokens) / elapsed / 1e6:.2f} M tokens/s, " if self.tokens else ""
        print(
            f"{self.name}: {(self.messages - messages) / elapsed:.1f} msg/s, {tokens_rate}"
            f"{(self.payload_bytes - payload) / elapsed / 1e6:.1f} MB/s, "
            f"blocked {100 * (self.blocked_s - blocked) / elapsed:.0f}% of the time, "
            f"{self.messages} messages handed to ZeroMQ, {sum(len(link.pending) for link in self.links)} orders pending",
            file=sys.stderr,
            flush=True,
        )
        self._last_time = now
        self._last = (self.messages, self.tokens, self.payload_bytes, self.blocked_s)

    def summary(self, **extra: Any) -> dict[str, Any]:
        seconds = time.monotonic() - self._started
        return {
            "messages_handed_to_zeromq": self.messages,
            "by_split": dict(self.by_split),
            "tokens_sent": self.tokens,
            "payload_bytes": self.payload_bytes,
            "seconds": round(seconds, 3),
            "blocked_fraction": round(self.blocked_s / seconds, 4) if seconds > 0 else 0.0,
            **extra,
        }


def print_summary(summary: dict[str, Any]) -> None:
    print("summary " + json.dumps(summary), file=sys.stderr, flush=True)
