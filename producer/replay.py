"""``python -m producer replay``: serve a recording's exact frames over the wire (docs/SPEC.md §5).

    python -m producer replay FILE --connect tcp://trainer:5555 [--loop] [--rate MSG_PER_S]

Every good record is sent as it was received (same frames, producer ids and sequence
numbers), on the same kind of PUSH socket as ``producer run``, so a trainer cannot tell a
replay from live producers. ``--loop`` starts over at the end of the file (the trainer then
counts the repeated sequence numbers as duplicates). On exit it prints a ``summary {json}``
line with the records sent and, for a file cut short or damaged, how much was lost.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from producer.sending import Sender, SenderSettings, StopSignal, Throughput, print_summary
from shared import settings
from shared.curve import CurveKeyError
from shared.recording import RecordingError, RecordingReader, RecordingReport
from shared.settings import setting


def add_command(subparsers: argparse._SubParsersAction) -> None:
    replay = subparsers.add_parser("replay", help="serve a recording over ZeroMQ",
                                   description="Send the exact frames of a recording over a ZeroMQ PUSH socket.")
    replay.add_argument("file", metavar="FILE", help="recording to serve")
    settings.add_arguments(replay, SenderSettings, title="transport")
    settings.add_arguments(replay, ReplaySettings, title="replay")
    replay.set_defaults(handler=run_replay, command_parser=replay)


def _check_rate(value: float) -> None:
    if not value > 0:
        raise ValueError(f"{value} is not a positive number")


@dataclass(frozen=True)
class ReplaySettings:
    loop: bool = setting(False, "start over at the end of the file")
    rate: float | None = setting(None, "send at most this many messages per second (none: as fast as the trainer takes them)",
                                 metavar="MSG_PER_S", check=_check_rate)


def run_replay(args: argparse.Namespace) -> int:
    try:
        RecordingReader(args.file).close()
    except (RecordingError, OSError) as error:
        args.command_parser.error(str(error))
    try:
        transport = settings.from_namespace(SenderSettings, args)
        options = settings.from_namespace(ReplaySettings, args)
        curve = transport.curve()
    except (ValueError, CurveKeyError) as error:
        args.command_parser.error(str(error))
    if len(transport.connect) > 1:
        args.command_parser.error("replay sends to one endpoint: give one --connect ADDR")
    stop = StopSignal()
    sender = Sender(transport.connect[0] if transport.connect else None, transport.bind, stop, curve=curve)
    throughput = Throughput(f"replay {args.file}", sender, transport.status_every)
    interval = 1.0 / options.rate if options.rate else 0.0
    next_send = time.monotonic()
    passes = 0
    report = RecordingReport()  # of the last complete pass (of the partial one if none completed)
    try:
        while not stop.is_set():
            with RecordingReader(args.file) as reader:
                completed = True
                for frames in reader:
                    if interval:
                        next_send = _pace(next_send, interval, stop)
                    if stop.is_set() or not sender.send(frames, while_blocked=throughput.tick):
                        completed = False
                        break
                    throughput.add("record", 0, sum(len(frame) for frame in frames[1:]))
                if completed or passes == 0:
                    report = reader.report
            if not completed:
                break
            passes += 1
            if not options.loop or report.records == 0:
                break
    finally:
        sender.close()
    print_summary(
        throughput.summary(
            file=args.file,
            records_sent=throughput.messages,
            complete_passes=passes,
            records_in_file=report.records,
            corrupt_records=report.corrupt_records,
            truncated=report.truncated,
            lost_bytes=report.lost_bytes,
            problem=report.problem,
            stopped_by_signal=stop.is_set(),
        )
    )
    return 0


def _pace(next_send: float, interval: float, stop: StopSignal) -> float:
    """Sleeps until ``next_send`` (in short steps, to notice a stop); returns the next slot."""
    while not stop.is_set():
        remaining = next_send - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(remaining, 0.1))
    return max(next_send, time.monotonic() - interval) + interval
