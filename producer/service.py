"""``python -m producer run``: stream batches to trainers over ZeroMQ PUSH (SPEC §3).

    python -m producer run --connect tcp://trainer:5555 [data flags] [--val-every N] [--max-messages M]
    python -m producer run --bind tcp://*:5555 ...      # reverse topology: the trainer connects
    python -m producer run --connect tcp://gpu0:5555 --connect tcp://gpu0:5556 ...   # data-parallel ranks

By default the trainer binds and producers connect (ZeroMQ retries the connection forever,
and messages wait in the socket until it succeeds). The send high-water mark is small, so a
slow or absent trainer blocks the producer instead of filling its memory. Messages are the
whole fixed val set first (a trainer needs it before its first step), then the train stream
with one val message after every ``--val-every`` train messages, cycling through the val set
forever, so a trainer that joins late still gets the whole set. Sequence numbers count every
message this producer sends: 0, 1, 2, ...

Several ``--connect`` endpoints (one per data-parallel trainer rank; also comma-separated) are
served by :class:`Routes`: train messages round-robin, each to one endpoint; every val message
to every endpoint; sequence numbers and wire producer ids per endpoint. ``--val-every`` then
counts the train messages each endpoint gets, and ``--max-messages`` the messages of the
stream (a val message counts once, however many endpoints it goes to).

SIGTERM or SIGINT stops it within a second. A status line goes to stderr every
``--status-every`` seconds (5; messages/s, tokens/s, MB/s, time blocked in send)
and a final ``summary {json}`` line on exit (``messages_sent`` counts the messages handed to
ZeroMQ). :class:`Sender`, :class:`StopSignal` and :class:`Throughput` are shared with
``producer replay``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from itertools import count
from typing import Any, Callable, Iterator

import numpy as np
import zmq

from producer.config import DataConfig, add_data_arguments
from producer.stream import BatchStream
from shared.curve import CurveClient, CurveKeyError, configure_client
from shared.meta import StreamMeta
from shared.wire import MAX_PRODUCER_ID_CHARS, encode

SEND_HWM = 4  # messages queued per connected trainer before send blocks
LINGER_MS = 500  # how long close() may still flush queued messages
POLL_MS = 100  # a blocked send wakes this often to notice a stop request


def add_command(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="stream batches to trainers over ZeroMQ",
                                description="Stream train and val messages over a ZeroMQ PUSH socket.")
    add_sender_arguments(run, connect_many=True)
    run.add_argument("--val-every", type=_non_negative_int, default=8, metavar="N",
                     help="send one val message after every N train messages; 0: no val messages (default: 8)")
    run.add_argument("--max-messages", type=_non_negative_int, default=None, metavar="M",
                     help="stop after M messages (default: run until SIGTERM/SIGINT)")
    add_data_arguments(run)
    run.set_defaults(handler=run_service, command_parser=run)


def add_sender_arguments(parser: argparse.ArgumentParser, connect_many: bool = False) -> None:
    """``--connect ADDR`` (the default topology) or ``--bind ADDR``, exactly one; ``--status-every``.
    With ``connect_many``, ``--connect`` may be repeated (or comma-separated): a list of strings."""
    where = parser.add_mutually_exclusive_group(required=True)
    if connect_many:
        where.add_argument("--connect", metavar="ADDR", action="append",
                           help="connect to a trainer that binds, e.g. tcp://trainer:5555; repeat it (or separate "
                                "with commas) for the ranks of a data-parallel trainer: train messages go round-robin, "
                                "val messages to each")
    else:
        where.add_argument("--connect", metavar="ADDR", help="connect to a trainer that binds, e.g. tcp://trainer:5555")
    where.add_argument("--bind", metavar="ADDR", help="bind here; trainers connect (e.g. tcp://*:5555)")
    parser.add_argument("--status-every", type=float, default=5.0, metavar="S",
                        help="seconds between status lines on stderr (default: 5)")
    curve = parser.add_argument_group("CurveZMQ (optional; both flags or neither, see docs/SECURITY.md)")
    curve.add_argument("--curve-secret-key", metavar="FILE", help="this producer's NAME.key_secret file")
    curve.add_argument("--curve-server-key", metavar="FILE", help="the trainer's public NAME.key file")


def curve_client(args: argparse.Namespace) -> CurveClient | None:
    """The Curve keys named by ``--curve-secret-key`` / ``--curve-server-key``; None when neither is given."""
    if args.curve_secret_key is None and args.curve_server_key is None:
        return None
    if args.curve_secret_key is None or args.curve_server_key is None:
        args.command_parser.error("--curve-secret-key and --curve-server-key go together")
    try:
        return CurveClient.from_files(args.curve_secret_key, args.curve_server_key)
    except CurveKeyError as error:
        args.command_parser.error(str(error))


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


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
    """

    def __init__(self, senders: list[Sender], producer_id: str) -> None:
        self.senders = senders
        self.producer_ids = [producer_id] if len(senders) == 1 else [route_producer_id(producer_id, i) for i in range(len(senders))]
        self.sent = [{"train": 0, "val": 0} for _ in senders]  # wire messages sent per endpoint
        self._next_train = 0

    @property
    def blocked_s(self) -> float:
        return sum(sender.blocked_s for sender in self.senders)

    def send(self, meta: StreamMeta, split: str, tensors: dict[str, np.ndarray], val_index: int, throughput: "Throughput") -> bool:
        """Sends one message of the stream (a val message to every endpoint); False if stopped."""
        targets = range(len(self.senders)) if split == "val" else [self._next_train]
        tokens = int(np.count_nonzero(tensors["attention_mask"]))
        payload_bytes = sum(array.nbytes for array in tensors.values())
        for index in targets:
            sent = self.sent[index]
            frames = encode(meta, split, self.producer_ids[index], sent["train"] + sent["val"], tensors, val_index=val_index)
            if not self.senders[index].send(frames, while_blocked=throughput.tick):
                return False
            sent[split] += 1
            throughput.add(split, tokens, payload_bytes)
        if split == "train":
            self._next_train = (self._next_train + 1) % len(self.senders)
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

    def __init__(self, name: str, sender: "Sender | Routes", status_every: float) -> None:
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


def messages(stream: BatchStream, val_every: int) -> Iterator[tuple[str, int, dict[str, np.ndarray]]]:
    """``(split, val_index, tensors)`` forever: the val set once, then cycles of ``val_every``
    train messages and the next val message (no val messages at all when ``val_every`` is 0)."""
    val_set = stream.val_set() if val_every else []
    for val_index, tensors in enumerate(val_set):
        yield "val", val_index, tensors
    train = stream.train_batches()
    for cycle in count():
        for _ in range(val_every if val_set else 1):
            yield "train", -1, next(train)
        if val_set:
            val_index = cycle % len(val_set)
            yield "val", val_index, val_set[val_index]


def run_service(args: argparse.Namespace) -> int:
    try:
        config = DataConfig.from_args(args)
        if config.producer_id is None:
            config = dataclasses.replace(config, producer_id=unique_producer_id())
        stream = BatchStream(config)
    except (ValueError, OSError) as error:  # bad corpus, stage file or flag combination
        args.command_parser.error(str(error))
    stop = StopSignal()
    curve = curve_client(args)
    if args.bind is not None:
        places = [(None, args.bind)]
    else:
        places = [(part.strip(), None) for value in args.connect for part in value.split(",") if part.strip()]
        if not places:
            args.command_parser.error("--connect needs an endpoint")
    senders: list[Sender] = []
    try:
        for connect, bind in places:
            senders.append(Sender(connect, bind, stop, curve=curve))
    except zmq.ZMQError as error:  # a malformed endpoint, a port in use...
        for sender in senders:
            sender.close()
        args.command_parser.error(f"cannot {'bind' if bind else 'connect'} {bind or connect}: {error}")
    routes = Routes(senders, stream.producer_id)
    throughput = Throughput(f"producer {stream.producer_id}", routes, args.status_every)
    print(
        f"producer {stream.producer_id}: stream {stream.meta.digest} ({stream.meta.val_messages} val messages) "
        f"{'to' if args.bind is None else 'on'} {', '.join(sender.endpoint for sender in senders)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        for index, (split, val_index, tensors) in enumerate(messages(stream, args.val_every * len(senders))):
            if stop.is_set() or (args.max_messages is not None and index >= args.max_messages):
                break
            if not routes.send(stream.meta, split, tensors, val_index, throughput):
                break
    finally:
        routes.close()
    print_summary(throughput.summary(producer_id=stream.producer_id, stopped_by_signal=stop.is_set(), routes=routes.summary()))
    return 0
