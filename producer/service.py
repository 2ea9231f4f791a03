"""``python -m producer run``: serve a trainer's orders over ZeroMQ (docs/SPEC.md §2.8, docs/PROTOCOL.md §6).

    python -m producer run --connect tcp://trainer:5555 [data flags] [--max-messages M]
    python -m producer run --bind tcp://*:5555 ...      # reverse topology: the trainer connects
    python -m producer run --connect tcp://gpu0:5555 --connect tcp://gpu0:5556 ...   # data-parallel ranks

A producer is a stateless worker: it announces its stream (a meta message, again every
``--meta-every`` seconds) and computes exactly the messages the trainer orders, each a pure
function of its index (``producer.stream``), so which producer computes a message, how many run,
and which of them crashed or restarted never changes what the trainer trains on. By default the
trainer binds and producers connect (ZeroMQ retries the connection forever); the trainer grants
each producer a small window of orders, so in-flight data is bounded by the orders.

Several ``--connect`` endpoints (one per data-parallel trainer rank; also comma-separated) are
each served their own orders (:class:`~producer.sending.Worker`). SIGTERM or SIGINT stops it
within a second. A status line goes to stderr every ``--status-every`` seconds, a plain warning
when no trainer has ordered anything for a while or a trainer refuses the stream, and a final
``summary {json}`` line on exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import numpy as np
import zmq

from producer.sending import SenderSettings, StopSignal, Throughput, Worker, open_links, print_summary, unique_producer_id
from producer.stream import BatchStream
from shared import settings
from shared.curve import CurveKeyError
from shared.data_config import DataConfig
from shared.mixture import MixtureExhausted
from shared.settings import setting


def _check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"{value} is not positive")


def _check_non_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"{value} is negative")


@dataclass(frozen=True)
class RunSettings:
    """What ``producer run`` does besides the data: an optional message limit and the meta cadence."""

    max_messages: int | None = setting(None, "stop after sending M train and val messages (none: run until SIGTERM/SIGINT)",
                                       metavar="M", check=_check_non_negative)
    meta_every: float = setting(2.0, "seconds between meta messages (the full stream meta) on each endpoint: the trainer "
                                     "learns of a producer, and that it is alive, by them", metavar="S", check=_check_positive)

    def __post_init__(self) -> None:
        settings.check_fields(self)


def add_command(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="serve a trainer's orders over ZeroMQ",
                                description="Compute and send the messages a trainer orders (docs/PROTOCOL.md §6).")
    settings.add_arguments(run, SenderSettings, title="transport")
    settings.add_arguments(run, RunSettings, title="stream")
    settings.add_arguments(run, DataConfig, title="data")
    run.set_defaults(handler=run_service, command_parser=run)


class LiveSource:
    """A :class:`~producer.sending.MessageSource` computing every message from the corpus."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream
        self.meta = stream.meta

    def message(self, split: str, index: int) -> dict[str, np.ndarray] | None:
        if split == "train":
            try:
                return self.stream.train_message(index)
            except MixtureExhausted:  # past the end of a mixture: such a message does not exist
                return None
        val_set = self.stream.val_set()
        return val_set[index] if 0 <= index < len(val_set) else None


def run_service(args: argparse.Namespace) -> int:
    try:
        transport = settings.from_namespace(SenderSettings, args)
        run = settings.from_namespace(RunSettings, args)
        config = settings.from_namespace(DataConfig, args)
        if config.producer_id is None:
            config = dataclasses.replace(config, producer_id=unique_producer_id())
        stream = BatchStream(config)
        stop = StopSignal()
        links = open_links(transport, stop)
    except (ValueError, OSError, CurveKeyError) as error:  # bad corpus, stage file, key file or flag combination
        args.command_parser.error(str(error))
    except zmq.ZMQError as error:  # a malformed endpoint, a port in use...
        args.command_parser.error(str(error))
    throughput = Throughput(f"producer {stream.producer_id}", links, transport.status_every)
    worker = Worker(links, LiveSource(stream), stream.producer_id, throughput, meta_every=run.meta_every)
    print(
        f"producer {stream.producer_id}: stream {stream.meta.digest} ({stream.meta.val_messages} val messages) "
        f"{'to' if transport.bind is None else 'on'} {', '.join(link.endpoint for link in links)}, serving orders",
        file=sys.stderr,
        flush=True,
    )
    try:
        worker.serve(stop, run.max_messages)
    finally:
        worker.close()
    print_summary(throughput.summary(producer_id=stream.producer_id, stopped_by_signal=stop.is_set(), links=worker.summary()))
    return 0
