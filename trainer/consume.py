"""``python -m trainer.consume``: pull batches without training, to watch or record a stream.

    python -m trainer.consume [--bind tcp://*:5555 | --connect ADDR] --batches 1000 [--batch-size 32] [--record FILE]

Prints one JSON line of stream statistics (``DatasetConsumer.stats()`` plus the batch and
mask-ratio numbers) per second to stdout, and a final line with ``"final": true`` after
``--batches`` batches. With ``--record`` the consumed messages go to a recording that
``python -m producer replay`` can serve. SIGTERM/SIGINT end it early, still with the final line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass

from shared import settings
from shared.endpoints import check_endpoints
from shared.settings import above, setting
from trainer.data.config import StreamSettings
from trainer.data.consumer import DatasetConsumer
from trainer.loop.config import TrainConfig


@dataclass(frozen=True)
class ConsumeSettings:
    """``--bind`` and ``--record`` are the trainer's, ``--batch-size`` the training loop's."""

    connect: str | None = setting(None, "connect to a producer that binds, instead of binding", metavar="ADDR",
                                  check=check_endpoints)
    batches: int | None = setting(None, "stop after N batches", metavar="N", check=above(0))
    val: bool = setting(False, "wait for the whole val set before the first batch")
    starved_after: float = setting(5.0, "seconds of silence before it reports waiting for producers", metavar="S",
                                   check=above(0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.consume", description=__doc__.split("\n\n")[0])
    settings.add_arguments(parser, ConsumeSettings, required=("batches",))
    settings.add_arguments(parser, StreamSettings, only=("bind", "record"))
    settings.add_arguments(parser, TrainConfig, only=("batch_size",))
    return parser.parse_args(argv)


def report(consumer: DatasetConsumer, batches: int, started: float, **extra) -> str:
    stats = consumer.stats().to_dict()
    cumulative = consumer.cumulative_mask_ratio.summary()
    stats.update(
        batches=batches,
        seconds=round(time.monotonic() - started, 3),
        last_batch=None if consumer.last_batch_stats is None else dataclasses.asdict(consumer.last_batch_stats),
        mask_ratio_cumulative=None if cumulative is None else dataclasses.asdict(cumulative),
        **extra,
    )
    return json.dumps(stats)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    consumer = DatasetConsumer(
        args.connect or args.bind,
        args.batch_size,
        bind=args.connect is None,
        record_path=args.record,
        starved_after_s=args.starved_after,
    )
    started = last_print = time.monotonic()
    done = 0
    with consumer:
        if args.val:
            while not stopping.is_set() and not consumer.wait_for_val_set(timeout=1.0):
                print(report(consumer, done, started), flush=True)
        while done < args.batches and not stopping.is_set():
            try:
                consumer.next_batch(timeout=1.0)
                done += 1
            except TimeoutError:
                pass
            if time.monotonic() - last_print >= 1.0:
                last_print = time.monotonic()
                print(report(consumer, done, started), flush=True)
        print(report(consumer, done, started, final=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
