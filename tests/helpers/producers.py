"""An in-process producer that serves a trainer's orders, for tests of the consumer (docs/PROTOCOL.md §6).

``OrderServer`` is a DEALER socket in a thread: it sends the stream's meta message (and again
every ``meta_every`` seconds), then answers each order with the message its ``messages(split,
index)`` callable makes (skipping those it returns None for), with its own sequence numbers.
``dealer`` opens a bare DEALER socket for tests that send hand-made (or hostile) messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from shared.meta import StreamMeta
from shared.wire import Order, WireError, decode_control, encode, encode_meta

from helpers.wire import INCARNATION

Messages = Callable[[str, int], "dict[str, np.ndarray] | None"]


def dealer(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """A DEALER connected to ``endpoint`` (a producer's socket type), lingering a second on close."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(endpoint)
    return socket


def listed(train: list, val: list | None = None) -> Messages:
    """Serves ``train[k]`` and ``val[i]``; None past their ends."""
    val = val or []

    def messages(split: str, index: int):
        source = train if split == "train" else val
        return source[index] if 0 <= index < len(source) else None

    return messages


class OrderServer:
    """A producer thread on ``endpoint`` serving orders from ``messages`` under ``meta``.
    ``orders`` lists every order received; ``sent`` counts the batches sent."""

    def __init__(self, endpoint: str, meta: StreamMeta, messages: Messages, producer_id: str = "p0",
                 meta_every: float = 0.2, incarnation: str = INCARNATION) -> None:
        self.endpoint, self.meta, self.messages = endpoint, meta, messages
        self.producer_id, self.meta_every, self.incarnation = producer_id, meta_every, incarnation
        self.orders: list[Order] = []
        self.sent = 0
        self.paused = threading.Event()  # while set, orders are taken but not answered (a stalled producer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> OrderServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        context = zmq.Context()
        socket = dealer(context, self.endpoint)
        seq, meta_at, pending = 0, float("-inf"), []
        try:
            while not self._stop.is_set():
                if time.monotonic() - meta_at >= self.meta_every:
                    socket.send_multipart(encode_meta(self.meta, self.producer_id, seq, incarnation=self.incarnation))
                    seq, meta_at = seq + 1, time.monotonic()
                if socket.poll(20):
                    try:
                        order = decode_control(socket.recv_multipart())
                    except WireError:
                        continue
                    if isinstance(order, Order):
                        self.orders.append(order)
                        pending.extend((order.split, i) for i in range(order.start, order.start + order.count))
                while pending and not self.paused.is_set():
                    split, index = pending.pop(0)
                    tensors = self.messages(split, index)
                    if tensors is None:
                        continue
                    socket.send_multipart(encode(self.meta, split, self.producer_id, seq, tensors, index,
                                                 incarnation=self.incarnation), copy=False)
                    seq += 1
                    self.sent += 1
        finally:
            socket.close(linger=500)
            context.term()
