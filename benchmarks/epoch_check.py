"""Exact epochs, checked from a recording (docs/SPEC.md §2.8; the issue's must-show).

Runs ``python -m trainer.consume --record FILE`` fed by N producers with ``--sampling epoch`` for
one epoch of train messages (plus one: the last message of an epoch may straddle into the next),
then reads the recording back and checks that its first ``epoch_rows`` train rows hold every
train line of the corpus exactly once: each line starts exactly one row or lies whole inside
exactly one row, none twice, none missing. Rows are decoded to text (their original tokens:
the label where a position is supervised, the input elsewhere) and split at line ends; a row cut
at ``block_size - 1`` (an overlong first line) counts as that line. Prints one JSON object;
exit status 0 when the epoch is exact.

    python benchmarks/epoch_check.py --corpus ../shared/data/tinyshakespeare.txt --producers 4
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.corpus import load_corpus  # noqa: E402
from shared.endpoints import free_port  # noqa: E402
from shared.recording import RecordingReader  # noqa: E402
from shared.wire import WireError, WireMessage, decode_stream  # noqa: E402


def record_one_epoch(args: argparse.Namespace, path: Path) -> None:
    """Records ``ceil(epoch_rows / R) + 1`` train messages consumed from ``args.producers`` producers."""
    data = ["--corpus", args.corpus, "--sampling", "epoch", "--block-size", str(args.block_size),
            "--rows-per-message", str(args.rows_per_message), "--seed", str(args.seed)]
    from producer.stream import BatchStream
    from shared.data_config import DataConfig

    epoch_rows = BatchStream(DataConfig(corpus=args.corpus, sampling="epoch", block_size=args.block_size,
                                        rows_per_message=args.rows_per_message)).packs_per_epoch
    batches = -(-epoch_rows // args.rows_per_message) + 1
    port = free_port()
    consume = subprocess.Popen([sys.executable, "-m", "trainer.consume", "--bind", f"tcp://127.0.0.1:{port}", "--batch-size",
                                str(args.rows_per_message), "--batches", str(batches), "--record", str(path)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    producers = [subprocess.Popen([sys.executable, "-m", "producer", "run", "--connect", f"tcp://127.0.0.1:{port}",
                                   "--producer-id", f"epoch-{i}", *data], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in range(args.producers)]
    try:
        if consume.wait(args.timeout) != 0:
            raise RuntimeError("trainer.consume failed")
    finally:
        for producer in producers:
            producer.send_signal(signal.SIGTERM)
        for producer in producers:
            producer.wait(30)


def check(path: Path, corpus_path: str) -> dict:
    """The epoch check of the recording at ``path`` against the train lines of ``corpus_path``."""
    with RecordingReader(path) as reader:
        messages = [m for m in decode_stream(reader) if not isinstance(m, WireError)]
    train = [m for m in messages if isinstance(m, WireMessage) and m.split == "train"]
    meta = train[0].meta
    corpus = load_corpus(corpus_path, meta.tokenizer if meta.tokenizer != "hf" else None)
    lines = corpus.train_lines()
    tokenizer = meta.tokens
    rows = []
    for message in train:
        x, y, valid_len = message.tensors["x"], message.tensors["y"], message.valid_len
        original = np.where(y != meta.ignore_index, y, x)
        rows += [original[row, : valid_len[row] - 1] for row in range(len(valid_len))]
    epoch = rows[: meta.epoch_rows]
    expected = collections.Counter()
    starts, offsets = lines.starts, lines.tokens
    for line in range(lines.n_lines):
        expected[tuple(offsets[starts[line] : starts[line + 1]].tolist())] += 1
    seen: collections.Counter = collections.Counter()
    truncated = 0
    for row in epoch:
        text = tokenizer.decode(row)
        pieces = text.splitlines(keepends=True)
        for piece in pieces:
            ids = tuple(tokenizer.encode(piece).tolist())
            if not piece.endswith("\n"):
                truncated += 1
                ids = next((line for line in expected if line[: len(ids)] == ids and len(line) > len(ids)), ids)
            seen[ids] += 1
    missing = expected - seen
    extra = seen - expected
    return {
        "recording": str(path), "k_recorded": [m.index for m in train][:3] + ["..."], "train_messages": len(train),
        "epoch_rows": meta.epoch_rows, "rows_checked": len(epoch), "train_lines": lines.n_lines,
        "lines_seen": sum(seen.values()), "truncated_rows": truncated, "missing": sum(missing.values()),
        "extra": sum(extra.values()), "exact": not missing and not extra and len(epoch) == meta.epoch_rows,
        "k_in_order": [m.index for m in train] == list(range(len(train))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rows-per-message", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", default=None, help="check this recording instead of making one")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.record:
        path = Path(args.record)
    else:
        path = Path(tempfile.mkdtemp(prefix="linepack-epoch-")) / "epoch.lps"
        record_one_epoch(args, path)
    result = {**check(path, args.corpus), "producers": args.producers, "wall_s": round(time.monotonic() - started, 1)}
    print(json.dumps(result))
    return 0 if result["exact"] and result["k_in_order"] else 1


if __name__ == "__main__":
    sys.exit(main())
