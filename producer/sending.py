"""Sending a stream over ZeroMQ PUSH sockets, shared by ``producer run`` and ``producer replay``.

:class:`Sender` is one PUSH socket that sends whole multipart messages without copying them and
blocks while the peer's queue is full (the back-pressure), waking every :data:`POLL_MS` to notice a
stop. :class:`Routes` spreads a stream over several trainer endpoints (one per data-parallel rank).
:class:`Throughput` counts what was sent and prints a status line; :class:`StopSignal` turns
SIGTERM/SIGINT into a flag. :class:`SenderSettings` are the transport flags both commands take.
"""

from __future__ import annotations

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
from typing import Any

import numpy as np
import zmq

from shared import settings
from shared.curve import CurveClient, configure_client
from shared.limits import MAX_PRODUCER_ID_CHARS
from shared.meta import StreamMeta
from shared.settings import setting
from shared.wire import encode, encode_meta, new_incarnation

SEND_HWM = 4  # messages queued per connected trainer before send blocks
LINGER_MS = 500  # how long close() may still flush queued messages
POLL_MS = 100  # a blocked send wakes this often to notice a stop request


def _check_status_every(value: float) -> None:
    if not value > 0:
        raise ValueError(f"{value} is not a positive number of seconds")


@dataclass(frozen=True)
class SenderSettings:
    """Where a producer sends: ``connect`` (the default topology; several endpoints for the ranks
    of a data-parallel trainer) or ``bind``, exactly one; and the optional CurveZMQ keys."""

    connect: tuple[str, ...] = setting((), "trainer endpoints to connect to, e.g. tcp://trainer:5555; repeat it (or separate "
                                           "with commas) for the ranks of a data-parallel trainer: train messages go "
                                           "round-robin, val messages to each", metavar="ADDR", many=True)
    bind: str | None = setting(None, "bind here instead; trainers connect (e.g. tcp://*:5555)", metavar="ADDR")
    status_every: float = setting(5.0, "seconds between status lines on stderr", metavar="S", check=_check_status_every)
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


class Sender:
    """A PUSH socket that sends whole multipart messages without copying them.

    :meth:`send` blocks while the peers' queues are full (that is the back-pressure), but
    wakes every :data:`POLL_MS` to give up when ``stop`` is set. ``blocked_s`` accumulates
    the time spent waiting.
    """

    def __init__(self, connect: str | None, bind: str | None, stop: StopSignal, curve: CurveClient | None = None) -> None:
        self.stop = stop
        self.blocked_s = 0.0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._socket.setsockopt(zmq.LINGER, LINGER_MS)
        try:
            if curve is not None:
                configure_client(self._socket, curve)
            if bind is not None:
                self._socket.bind(bind)
                self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._socket.connect(connect)
                self.endpoint = connect
        except zmq.ZMQError:
            self._socket.close(linger=0)
            self._context.term()
            raise

    def send(self, frames: list[Any], while_blocked: Callable[[], None] = lambda: None) -> bool:
        """Sends one message; False if a stop was requested before it could be sent.
        ``while_blocked`` is called after every :data:`POLL_MS` spent waiting."""
        while True:
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            if self.stop.is_set():
                return False
            started = time.monotonic()
            self._socket.poll(POLL_MS, zmq.POLLOUT)
            self.blocked_s += time.monotonic() - started
            while_blocked()

    def close(self) -> None:
        """Closes the socket; queued messages get at most :data:`LINGER_MS` to leave."""
        self.close_socket()
        self._context.term()

    def close_socket(self) -> None:
        """Starts the linger without waiting for it (``close`` = this + waiting)."""
        self._socket.close(linger=LINGER_MS)


def route_producer_id(producer_id: str, index: int) -> str:
    """The wire producer id of endpoint ``index``: ``ID/index``, ``ID`` cut to fit the limit."""
    suffix = f"/{index}"
    return producer_id[: MAX_PRODUCER_ID_CHARS - len(suffix)] + suffix


class Routes:
    """Where ``producer run`` sends: one :class:`Sender` (PUSH socket) per trainer endpoint.

    Train messages go round-robin, each to exactly one endpoint, so no two data-parallel ranks
    train on the same message; val messages go to every endpoint, because every rank needs the
    whole fixed val set. (One PUSH socket connected to every endpoint would round-robin by
    itself, but it skips peers whose queue is full, so it could not promise each rank the val
    set.) Each endpoint has its own sequence numbers 0, 1, 2, ... and, when there are several,
    its own wire producer id (:func:`route_producer_id`), so each rank's gap accounting is exact
    and no ``(producer id, seq)`` pair reaches two ranks. A full endpoint blocks the producer:
    data-parallel ranks take batches in lockstep, so they share the stream evenly.

    Every endpoint gets a meta message (the full stream meta) before its first batch and again
    whenever ``meta_every`` seconds have passed, so a trainer that starts or restarts mid-stream
    pins the stream within that time; batches name the meta by digest only. ``incarnation`` is
    this run's random id: a restarted producer with the same id starts a new sequence.
    """

    def __init__(self, senders: list[Sender], producer_id: str, meta_every: float = 2.0,
                 incarnation: str | None = None) -> None:
        self.senders = senders
        self.producer_ids = [producer_id] if len(senders) == 1 else [route_producer_id(producer_id, i) for i in range(len(senders))]
        self.sent = [{"meta": 0, "train": 0, "val": 0} for _ in senders]  # wire messages sent per endpoint
        self.meta_every = meta_every
        self.incarnation = incarnation or new_incarnation()
        self._meta_sent_at = [float("-inf")] * len(senders)
        self._next_train = 0

    @property
    def blocked_s(self) -> float:
        return sum(sender.blocked_s for sender in self.senders)

    def send(self, meta: StreamMeta, split: str, tensors: dict[str, np.ndarray], val_index: int, throughput: Throughput) -> bool:
        """Sends one message of the stream (a val message to every endpoint); False if stopped."""
        targets = range(len(self.senders)) if split == "val" else [self._next_train]
        tokens = int(np.count_nonzero(tensors["attention_mask"]))
        payload_bytes = sum(array.nbytes for array in tensors.values())
        for index in targets:
            if time.monotonic() - self._meta_sent_at[index] >= self.meta_every and not self._send_meta(meta, index, throughput):
                return False
            frames = encode(meta, split, self.producer_ids[index], self._seq(index), tensors, val_index=val_index,
                            incarnation=self.incarnation)
            if not self.senders[index].send(frames, while_blocked=throughput.tick):
                return False
            self.sent[index][split] += 1
            throughput.add(split, tokens, payload_bytes)
        if split == "train":
            self._next_train = (self._next_train + 1) % len(self.senders)
        return True

    def _seq(self, index: int) -> int:
        return sum(self.sent[index].values())

    def _send_meta(self, meta: StreamMeta, index: int, throughput: Throughput) -> bool:
        frames = encode_meta(meta, self.producer_ids[index], self._seq(index), incarnation=self.incarnation)
        if not self.senders[index].send(frames, while_blocked=throughput.tick):
            return False
        self.sent[index]["meta"] += 1
        self._meta_sent_at[index] = time.monotonic()
        throughput.add("meta", 0, len(frames[1]))
        return True

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"endpoint": sender.endpoint, "producer_id": producer_id, **sent}
            for sender, producer_id, sent in zip(self.senders, self.producer_ids, self.sent)
        ]

    def close(self) -> None:
        """Closes every endpoint; their lingers run at the same time, so the whole takes at most
        :data:`LINGER_MS` however many endpoints there are."""
        for sender in self.senders:
            sender.close_socket()
        for sender in self.senders:
            sender.close()


class Throughput:
    """Counts what was sent; prints a status line to stderr every ``status_every`` seconds."""

    def __init__(self, name: str, sender: Sender | Routes, status_every: float) -> None:
        self.name = name
        self.sender = sender
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
            f"blocked {100 * (self.sender.blocked_s - blocked) / elapsed:.0f}% of the time, "
            f"{self.messages} messages sent",
            file=sys.stderr,
            flush=True,
        )
        self._last_time = now
        self._last = (self.messages, self.tokens, self.payload_bytes, self.sender.blocked_s)

    def summary(self, **extra: Any) -> dict[str, Any]:
        seconds = time.monotonic() - self._started
        return {
            "messages_sent": self.messages,
            "by_split": dict(self.by_split),
            "tokens_sent": self.tokens,
            "payload_bytes": self.payload_bytes,
            "seconds": round(seconds, 3),
            "blocked_fraction": round(self.sender.blocked_s / seconds, 4) if seconds > 0 else 0.0,
            **extra,
        }


def print_summary(summary: dict[str, Any]) -> None:
    print("summary " + json.dumps(summary), file=sys.stderr, flush=True)
