"""``python -m producer replay``: serve a recording's messages to a trainer's orders (docs/SPEC.md §5).

    python -m producer replay FILE --connect tcp://trainer:5555 [--loop] [--rate MSG_PER_S]

A replay is a producer whose messages come from a file: it reads the recording once, notes
where each message of the stream lies (train messages by their schedule index k, val messages
by their val index), and then serves the trainer's orders exactly like ``producer run``, on the
same kind of connection, with its tensor frames as recorded, so a trainer cannot tell a replay
from live producers. A train message recorded twice (a trainer resumed with the same
``--record`` records again what it consumed after its last checkpoint) is the same message
both times (message k is a pure function of k); the first copy is served. Recordings of
protocols 1 and 2, whose train messages had no index, are served in file order (the n-th train
message of the file is k = n). Without ``--loop`` the replay ends when the trainer asks for a
train message the file does not hold; with it, train message k is the file's (k mod n)-th.
On exit it prints a ``summary {json}`` line with what was served and, for a file cut short or
damaged, how much was lost.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq

from producer.sending import SenderSettings, StopSignal, Throughput, Worker, open_links, print_summary
from shared import settings
from shared.curve import CurveKeyError
from shared.meta import StreamMeta
from shared.recording import RecordingError, RecordingReader, RecordingReport
from shared.settings import above, setting
from shared.wire import MetaMessage, WireError, decode


def add_command(subparsers: argparse._SubParsersAction) -> None:
    replay = subparsers.add_parser("replay", help="serve a recording to a trainer's orders",
                                   description="Serve the messages of a recording to a trainer's orders over ZeroMQ.")
    replay.add_argument("file", metavar="FILE", help="recording to serve")
    settings.add_arguments(replay, SenderSettings, title="transport")
    settings.add_arguments(replay, ReplaySettings, title="replay")
    replay.set_defaults(handler=run_replay, command_parser=replay)


@dataclass(frozen=True)
class ReplaySettings:
    loop: bool = setting(False, "serve train message k from the file's (k mod n)-th, for ever")
    rate: float | None = setting(None, "send at most this many messages per second (none: as fast as the trainer orders them)",
                                 metavar="MSG_PER_S", check=above(0))


class RecordingSource:
    """A :class:`~producer.sending.MessageSource` over a recording: the first stream it holds
    (its first meta), its messages looked up by split and index, read back when ordered."""

    def __init__(self, path: str, loop: bool, rate: float | None, stop: StopSignal) -> None:
        self.reader = RecordingReader(path)
        self.loop = loop
        self.stop = stop
        self.interval = 1.0 / rate if rate else 0.0
        self._next_send = time.monotonic()
        self.meta: StreamMeta | None = None
        self.train: dict[int, int] = {}  # k -> record offset
        self.val: dict[int, int] = {}  # val index -> record offset
        self.undecodable = 0  # records that are not a message of the stream
        self._index()
        self._train_order = sorted(self.train)

    def _index(self) -> None:
        metas: dict[str, StreamMeta] = {}
        unindexed = 0  # train messages of protocols 1 and 2, numbered in file order
        for frames in self.reader:
            try:
                message = decode(frames, metas)
            except WireError:
                self.undecodable += 1
                continue
            if isinstance(message, MetaMessage):
                metas[message.meta.digest] = message.meta
                self.meta = self.meta or message.meta
                continue
            if self.meta is None:
                self.meta = message.meta  # protocol 1: the meta rides in every batch
            if message.meta.digest != self.meta.digest:
                self.undecodable += 1
                continue
            if message.split == "val":
                self.val.setdefault(message.index, self.reader.record_offset)
                continue
            k = message.index
            if k < 0:
                k, unindexed = unindexed, unindexed + 1
            self.train.setdefault(k, self.reader.record_offset)

    @property
    def report(self) -> RecordingReport:
        return self.reader.report

    def message(self, split: str, index: int) -> dict[str, np.ndarray] | None:
        offsets = self.val if split == "val" else self.train
        offset = offsets.get(index)
        if offset is None and split == "train" and self.loop and self._train_order:
            offset = self.train[self._train_order[index % len(self._train_order)]]
        if offset is None:
            return None
        if self.interval:
            self._pace()
        message = decode(self.reader.read_at(offset), {self.meta.digest: self.meta})
        return dict(message.tensors)

    def _pace(self) -> None:
        """Sleeps until the next send slot (in short steps, to notice a stop)."""
        while not self.stop.is_set():
            remaining = self._next_send - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(remaining, 0.1))
        self._next_send = max(self._next_send, time.monotonic() - self.interval) + self.interval


def run_replay(args: argparse.Namespace) -> int:
    stop = StopSignal()
    try:
        transport = settings.from_namespace(SenderSettings, args)
        options = settings.from_namespace(ReplaySettings, args)
        source = RecordingSource(args.file, options.loop, options.rate, stop)
        if source.meta is None:
            raise RecordingError(f"{args.file} holds no message of a stream")
        links = open_links(transport, stop)
    except (RecordingError, OSError, ValueError, CurveKeyError, zmq.ZMQError) as error:
        args.command_parser.error(str(error))
    throughput = Throughput(f"replay {args.file}", links, transport.status_every)
    worker = Worker(links, source, f"replay-{source.meta.digest}", throughput)
    missing: list[str] = []

    def unavailable(split: str, index: int) -> bool:
        missing.append(f"{split} {index}")
        print(f"replay {args.file}: the trainer ordered {split} message {index}, which the recording does not hold "
              f"({len(source.train)} train messages, {len(source.val)} val); stopping", file=sys.stderr, flush=True)
        return False

    print(f"replay {args.file}: stream {source.meta.digest}, {len(source.train)} train and {len(source.val)} val messages, "
          f"serving orders on {', '.join(link.endpoint for link in links)}", file=sys.stderr, flush=True)
    try:
        worker.serve(stop, on_unavailable=unavailable)
    finally:
        worker.close()
        source.reader.close()
    report = source.report
    print_summary(
        throughput.summary(
            file=args.file,
            records_sent=throughput.by_split.get("train", 0) + throughput.by_split.get("val", 0),
            records_in_file=report.records,
            train_messages=len(source.train),
            val_messages=len(source.val),
            not_held=missing,
            corrupt_records=report.corrupt_records,
            truncated=report.truncated,
            lost_bytes=report.lost_bytes,
            problem=report.problem,
            stopped_by_signal=stop.is_set(),
        )
    )
    return 0
