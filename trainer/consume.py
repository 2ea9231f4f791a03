"""``python -m trainer.consume``: pull batches without training, to watch or record a stream.

    python -m trainer.consume --bind tcp://*:5555 --batches 1000 [--batch-size 32] [--record FILE]

Prints one JSON line of stream statistics (``DatasetConsumer.stats()`` plus the batch and
mask-ratio numbers) per second to stdout, and a final line with ``"final": true`` after
``--batches`` batches. With ``--record`` the consumed messages go to a recording that
``python -m producer replay`` can serve. SIGTERM/SIGINT end it early, still with the final line.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

from trainer.consumer import DatasetConsumer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.consume", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bind", metavar="ADDR", help="bind here; producers connect (e.g. tcp://*:5555)")
    where.add_argument("--connect", metavar="ADDR", help="connect to a producer that binds")
    parser.add_argument("--batches", type=int, required=True, metavar="N", help="stop after N batches")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="rows per batch (default: 32)")
    parser.add_argument("--record", metavar="FILE", default=None, help="record the consumed messages here")
    parser.add_argument("--val", action="store_true", help="wait for the whole val set before the first batch")
    parser.add_argument("--starved-after", type=float, default=5.0, metavar="S",
                        help="seconds of silence before it reports waiting for producers (default: 5)")
    return parser.parse_args(argv)


def report(consumer: DatasetConsumer, batches: int, started: float, **extra) -> str:
    stats = consumer.stats()
    stats.update(
        batches=batches,
        seconds=round(time.monotonic() - started, 3),
        last_batch=consumer.last_batch_stats,
        mask_ratio_cumulative=consumer.cumulative_mask_ratio.to_dict(),
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
        args.bind or args.connect,
        args.batch_size,
        bind=args.bind is not None,
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
