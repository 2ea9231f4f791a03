"""Producer throughput: packing + corruption + wire encoding, in one process.

For each packing (lines, fixed) and policy (bert, uniform, stages, span) at block 1024 and 64 rows
per message, it times the product's vectorized ``BatchStream`` and a straightforward per-row
Python reference (below, not part of the product) on the same corpus, and prints tokens/s
(rows x block_size per second) and the speed-up.

    python benchmarks/producer.py [--messages 200] [--reference-messages 4] [--corpus PATH]
    python benchmarks/producer.py --mix code=prepared/code:0.2 --mix prose=prepared/prose:0.8 [--rounds 15] [--messages 40]

Default corpus: data/tinyshakespeare.txt (shipped with the repository). With ``--mix`` (two or
more ``[NAME=]PATH[:WEIGHT]``, as ``--corpus`` takes them) it times instead, in the same run and
for lines packing with each policy, every source alone and the mixture of them, and prints the
mixture's tokens/s against the rate its shares of the single sources would give (the harmonic
mean of their rates weighted by share: what a mixture costs if mixing itself costs nothing),
the median over rounds of that ratio and the ratio of the best rates (:func:`mixture_table`).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.corpus import read_text  # noqa: E402
from producer.mixture import declared_sources  # noqa: E402
from producer.prepared import is_prepared  # noqa: E402
from producer.stream import BatchStream  # noqa: E402
from shared.data_config import DataConfig  # noqa: E402
from shared.vocab import IGNORE_INDEX  # noqa: E402
from shared.wire import encode  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"  # shipped: data/README.md
BLOCK_SIZE, ROWS = 1024, 64


class ReferenceProducer:
    """The obvious implementation: one row at a time, Python lists, ``random.Random``."""

    def __init__(self, stream: BatchStream, text: str, seed: int = 0) -> None:
        self.config = stream.config
        self.tokenizer = stream.tokenizer
        lines = text.splitlines(keepends=True)
        n_train = stream.corpus.split_line  # the same train lines as the vectorized stream
        self.tokens = stream.tokenizer.encode("".join(lines[:n_train])).tolist()
        self.line_starts, offset = [], 0
        for line in lines[:n_train]:
            self.line_starts.append(offset)
            offset += len(line)
        self.line_starts.append(offset)
        self.random = random.Random(seed)
        self.plan = stream.corruption.policy if stream.corruption.carries_stage else None

    def message(self) -> dict[str, np.ndarray]:
        rows = [self.row() for _ in range(ROWS)]
        batch = {name: np.array([row[i] for row in rows], dtype=dtype) for i, (name, dtype) in
                 enumerate([("x", np.uint16), ("y", np.int16), ("attention_mask", np.uint8), ("mask_ratio", np.float32)])}
        if self.plan is not None:
            batch["stage"] = np.array([row[4] for row in rows], dtype=np.uint8)
        return batch

    def row(self):
        vocabulary, rnd = self.tokenizer, self.random
        if self.config.packing == "fixed":
            offset = rnd.randrange(len(self.tokens) - BLOCK_SIZE + 1)
            content = self.tokens[offset : offset + BLOCK_SIZE]
            x, n_candidates = list(content), BLOCK_SIZE
        else:
            line = rnd.randrange(len(self.line_starts) - 1)
            content = []
            while line < len(self.line_starts) - 1:
                piece = self.tokens[self.line_starts[line] : self.line_starts[line + 1]]
                if len(content) + len(piece) > BLOCK_SIZE - 1:
                    if not content:
                        content = piece[: BLOCK_SIZE - 1]
                    break
                content += piece
                line += 1
            x = content + [vocabulary.sep_id] + [vocabulary.pad_id] * (BLOCK_SIZE - 1 - len(content))
            n_candidates = len(content)
        mask = [1] * (len(content) + (self.config.packing == "lines")) + [0] * (BLOCK_SIZE - len(content) - 1)
        chosen, all_mask, stage = self.choose(n_candidates)
        y = [IGNORE_INDEX] * BLOCK_SIZE
        for t in chosen:
            y[t] = x[t]
            u = rnd.random()
            if all_mask or u < 0.8:
                x[t] = vocabulary.mask_id
            elif u < 0.9:
                x[t] = rnd.choice([i for i in range(vocabulary.base_size) if i != x[t]])
        return x, y, mask[:BLOCK_SIZE], len(chosen) / max(n_candidates, 1), stage

    def choose(self, n):
        rnd, config = self.random, self.config
        if config.policy == "bert":
            return [t for t in range(n) if rnd.random() < config.mask_prob], False, 0
        if config.policy == "uniform":
            return rnd.sample(range(n), round(rnd.uniform(*config.ratio_range) * n)), False, 0
        if config.policy == "span":
            return self.spans(n), False, 0
        stage_index = rnd.randrange(len(self.plan.train))
        stage = self.plan.train[stage_index]
        if stage.type == "random":
            return rnd.sample(range(n), round(rnd.uniform(0, stage.max_masked_ratio) * n)), False, stage_index
        if stage.type == "span":
            points = sorted(rnd.randrange(n) for _ in range(2 * stage.spans_count)) if n else []
            covered = {t for a, b in zip(points[::2], points[1::2]) for t in range(a, b + 1)}
            return sorted(covered), True, stage_index
        target, chosen = min(math.ceil(stage.target_masked_ratio * n), n), set()
        while len(chosen) < target:
            added = [t for t in range(n) if t not in chosen and rnd.random() < (
                stage.p2_probability if (t - 1 in chosen or t + 1 in chosen) else stage.p1_probability)]
            chosen.update(rnd.sample(added, min(len(added), target - len(chosen))))
        return sorted(chosen), False, stage_index


    def spans(self, n):
        """Span masking, one span at a time: geometric lengths up to the count, each span after a
        uniform share of the row's free candidates (a gap of one between spans where there is room)."""
        rnd, target = self.random, min(round(self.config.span_ratio * n), n)
        lengths = []
        while sum(lengths) < target:
            length = 1 + int(math.log(1.0 - rnd.random()) / math.log1p(-1.0 / self.config.span_mean)) \
                if self.config.span_mean > 1 else 1
            lengths.append(min(length, target - sum(lengths)))
        gap = 1 if n - target >= len(lengths) - 1 else 0
        free = n - target - max(len(lengths) - 1, 0) * gap
        chosen = []
        for j, before in enumerate(sorted(rnd.randint(0, free) for _ in lengths)):
            start = before + sum(lengths[:j]) + j * gap
            chosen += range(start, start + lengths[j])
        return chosen


def tokens_per_second(make_message, meta, messages: int, chunks: int) -> float:
    """Best rate over ``chunks`` timed runs of ``messages // chunks`` messages each, timed in CPU
    seconds of this (single-threaded) process: other load on a shared machine then barely
    matters, and the best run is the closest to the true cost."""
    encode(meta, "train", "0", 0, make_message(), 0)  # warm-up
    per_chunk = max(messages // chunks, 1)
    best = math.inf
    for _ in range(chunks):
        start = time.process_time()
        for seq in range(per_chunk):
            encode(meta, "train", "0", seq, make_message(), seq)
        best = min(best, time.process_time() - start)
    return per_chunk * ROWS * BLOCK_SIZE / best


def mixture_table(sources: list[str], messages: int, rounds: int) -> None:
    """The ``--mix`` comparison, per policy (lines packing): each source alone and the mixture, on
    the same corpora (a prepared source opened again, as a producer of it alone would; a text
    source with the mixture's tokenizer), block size, rows and policy. Timed in ``rounds`` rounds
    of ``messages`` messages of each stream, the streams' order rotating from round to round;
    each round gives the mixture's rate over the rate its shares of the sources alone would give
    (the share-weighted harmonic mean of their rates: what a mixture costs if mixing itself costs
    nothing). Printed: the median of those ratios, and the ratio of the best rates."""
    print(f"mixture of {len(sources)} sources; block {BLOCK_SIZE}, {ROWS} rows per message; packing + corruption + wire "
          f"encoding, one process; CPU time of {rounds} rounds of {messages} messages of each stream\n")
    print("| policy | " + " | ".join(f"{spec} alone M tokens/s" for spec in sources)
          + " | mixture M tokens/s | mixture / expected, median of rounds | mixture / expected, best rates |")
    print("| --- |" + " ---: |" * (len(sources) + 3))
    for policy in ("bert", "uniform", "stages"):
        config = DataConfig(corpus=tuple(sources), block_size=BLOCK_SIZE, rows_per_message=ROWS, policy=policy)
        mixture = BatchStream(config)
        specs = declared_sources(config)
        streams = [mixture] + [BatchStream(DataConfig(corpus=spec.path, block_size=BLOCK_SIZE, rows_per_message=ROWS, policy=policy),
                                           corpus=None if is_prepared(spec.path) else rows.corpus)
                               for spec, rows in zip(specs, mixture.sources)]
        shares = np.array([spec.weight for spec in specs]) / sum(spec.weight for spec in specs)
        batches = [stream.train_batches() for stream in streams]
        rates = np.zeros((rounds, len(streams)))
        for r in range(rounds):
            for i in np.roll(np.arange(len(streams)), r):
                rates[r, i] = tokens_per_second(lambda it=batches[i]: next(it), streams[i].meta, messages, chunks=1)
        ratios = rates[:, 0] * np.sum(shares / rates[:, 1:], axis=1)
        best = rates.max(axis=0)
        print(f"| {policy} | " + " | ".join(f"{rate / 1e6:.1f}" for rate in best[1:]) + f" | {best[0] / 1e6:.1f} | "
              f"{np.median(ratios):.3f} | {best[0] * np.sum(shares / best[1:]):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, help="messages timed per vectorized config (default 200; "
                        "with --mix: per stream and round, default 40)")
    parser.add_argument("--rounds", type=int, default=15, help="with --mix: rounds of --messages messages of each stream")
    parser.add_argument("--reference-messages", type=int, default=4, help="messages timed per reference config")
    parser.add_argument("--corpus", default=str(SHAKESPEARE))
    parser.add_argument("--mix", action="append", default=[], metavar="[NAME=]PATH[:WEIGHT]",
                        help="a source of a mixture (repeat it): time the mixture against its sources alone")
    args = parser.parse_args()
    if args.mix:
        mixture_table(args.mix, args.messages or 40, args.rounds)
        return
    corpus = read_text(args.corpus)
    print(f"corpus {corpus.name} ({len(corpus.text):,} characters); block {BLOCK_SIZE}, {ROWS} rows per message; "
          f"packing + corruption + wire encoding, one process; CPU time, best of 10 "
          f"(vectorized) / {args.reference_messages} (reference) timed runs\n")
    print("| packing | policy | vectorized M tokens/s | reference M tokens/s | speed-up |")
    print("| --- | --- | ---: | ---: | ---: |")
    for packing in ("lines", "fixed"):
        for policy in ("bert", "uniform", "stages", "span"):
            config = DataConfig(corpus=args.corpus, block_size=BLOCK_SIZE, rows_per_message=ROWS, packing=packing, policy=policy)
            stream = BatchStream(config, corpus=corpus)
            batches = stream.train_batches()
            fast = tokens_per_second(lambda batches=batches: next(batches), stream.meta, args.messages or 200, chunks=10)
            reference = ReferenceProducer(stream, corpus.text)
            slow = tokens_per_second(reference.message, stream.meta, args.reference_messages, chunks=args.reference_messages)
            print(f"| {packing} | {policy} | {fast / 1e6:.1f} | {slow / 1e6:.3f} | {fast / slow:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
