"""A producer's memory with random and with epoch sampling on one (large, prepared) corpus.

    python benchmarks/epoch_memory.py --corpus prepared/ [--messages 3000] [--block-size 1024]

For each sampling, one ``python -m producer run`` serves ``--messages`` messages to an in-process
``DatasetConsumer``; printed as JSON: seconds to its first message, its resident size after them
(VmRSS) and its peak (VmHWM), in MiB. Epoch sampling builds the epoch's pack table into the cache
folder on first use (``producer.packs``) and maps it after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.data.consumer import DatasetConsumer  # noqa: E402


def status_mib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    raise KeyError(key)


def measure(corpus: str, sampling: str, messages: int, block_size: int) -> dict:
    with DatasetConsumer("tcp://127.0.0.1:*", 16) as consumer:
        started = time.monotonic()
        producer = subprocess.Popen([sys.executable, "-m", "producer", "run", "--connect", consumer.endpoint, "--corpus", corpus,
                                     "--block-size", str(block_size), "--rows-per-message", "16", "--sampling", sampling],
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            consumer.wait_for_meta(600)
            first = time.monotonic() - started
            for _ in range(messages):
                consumer.next_batch(timeout=120)
            return {"first_message_s": round(first, 2), "rss_mib": status_mib(producer.pid, "VmRSS"),
                    "peak_rss_mib": status_mib(producer.pid, "VmHWM"), "epoch_rows": consumer.meta.epoch_rows}
        finally:
            producer.terminate()
            producer.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--block-size", type=int, default=1024)
    args = parser.parse_args()
    print(json.dumps({sampling: measure(args.corpus, sampling, args.messages, args.block_size) for sampling in ("random", "epoch")}))


if __name__ == "__main__":
    main()
