"""``python -m producer replay``: serve a recording's exact frames over the wire (SPEC §5).

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

from producer.service import Sender, StopSignal, Throughput, add_sender_arguments, curve_client, print_summary
from shared.recording import RecordingError, RecordingReader, RecordingReport


def add_command(subparsers: argparse._SubParsersAction) -> None:
    replay = subparsers.add_parser("replay", help="serve a recording over ZeroMQ",
                                   description="Send the exact frames of a recording over a ZeroMQ PUSH socket.")
    replay.add_argument("file", metavar="FILE", help="recording to serve")
    add_sender_arguments(replay)
    replay.add_argument("--loop", action="store_true", help="start over at the end of the file")
    replay.add_argument("--rate", type=_positive_float, default=None, metavar="MSG_PER_S",
                        help="send at most this many messages per second (default: as fast as the trainer takes them)")
    replay.set_defaults(handler=run_replay, command_parser=replay)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def run_replay(args: argparse.Namespace) -> int:
    try:
        RecordingReader(args.file).close()
    except (RecordingError, OSError) as error:
        args.command_parser.error(str(error))
    stop = StopSignal()
    sender = Sender(args.connect, args.bind, stop, curve=curve_client(args))
    throughput = Throughput(f"replay {args.file}", sender, args.status_every)
    interval = 1.0 / args.rate if args.rate else 0.0
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
            if not args.loop or report.records == 0:
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
