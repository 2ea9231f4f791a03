"""``python -m producer run``: stream batches to trainers over ZeroMQ PUSH (docs/SPEC.md §3).

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
ZeroMQ). The sockets and counters live in :mod:`producer.sending`, shared with ``producer replay``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

import numpy as np
import zmq

from producer.sending import Routes, Sender, SenderSettings, StopSignal, Throughput, print_summary, unique_producer_id
from producer.stream import BatchStream
from shared import settings
from shared.curve import CurveKeyError
from shared.data_config import DataConfig
from shared.settings import setting


def _check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"{value} is not positive")


def _check_non_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"{value} is negative")


@dataclass(frozen=True)
class RunSettings:
    """What ``producer run`` sends besides the data: the val cadence and an optional message limit."""

    val_every: int = setting(8, "send one val message after every N train messages; 0: no val messages",
                             metavar="N", check=_check_non_negative)
    max_messages: int | None = setting(None, "stop after M train and val messages (none: run until SIGTERM/SIGINT)",
                                       metavar="M", check=_check_non_negative)
    meta_every: float = setting(2.0, "seconds between meta messages (the full stream meta) on each endpoint; a trainer "
                                     "that starts mid-stream pins the stream within this", metavar="S", check=_check_positive)

    def __post_init__(self) -> None:
        settings.check_fields(self)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="stream batches to trainers over ZeroMQ",
                                description="Stream train and val messages over a ZeroMQ PUSH socket.")
    settings.add_arguments(run, SenderSettings, title="transport")
    settings.add_arguments(run, RunSettings, title="stream")
    settings.add_arguments(run, DataConfig, title="data")
    run.set_defaults(handler=run_service, command_parser=run)


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
        transport = settings.from_namespace(SenderSettings, args)
        run = settings.from_namespace(RunSettings, args)
        curve = transport.curve()
        config = settings.from_namespace(DataConfig, args)
        if config.producer_id is None:
            config = dataclasses.replace(config, producer_id=unique_producer_id())
        stream = BatchStream(config)
    except (ValueError, OSError, CurveKeyError) as error:  # bad corpus, stage file, key file or flag combination
        args.command_parser.error(str(error))
    stop = StopSignal()
    places = [(None, transport.bind)] if transport.bind is not None else [(endpoint, None) for endpoint in transport.connect]
    senders: list[Sender] = []
    try:
        for connect, bind in places:
            senders.append(Sender(connect, bind, stop, curve=curve))
    except zmq.ZMQError as error:  # a malformed endpoint, a port in use...
        for sender in senders:
            sender.close()
        args.command_parser.error(f"cannot {'bind' if bind else 'connect'} {bind or connect}: {error}")
    routes = Routes(senders, stream.producer_id, meta_every=run.meta_every)
    throughput = Throughput(f"producer {stream.producer_id}", routes, transport.status_every)
    print(
        f"producer {stream.producer_id}: stream {stream.meta.digest} ({stream.meta.val_messages} val messages) "
        f"{'to' if transport.bind is None else 'on'} {', '.join(sender.endpoint for sender in senders)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        for index, (split, val_index, tensors) in enumerate(messages(stream, run.val_every * len(senders))):
            if stop.is_set() or (run.max_messages is not None and index >= run.max_messages):
                break
            if not routes.send(stream.meta, split, tensors, val_index, throughput):
                break
    finally:
        routes.close()
    print_summary(throughput.summary(producer_id=stream.producer_id, stopped_by_signal=stop.is_set(), routes=routes.summary()))
    return 0
