"""``python -m producer record`` writes a stream straight to a recording file; ``python -m
producer inspect`` summarises one as a single JSON object (docs/SPEC.md §5, §6 definitions).

    python -m producer record --out FILE --messages M [--split train|val] [data flags]

``record`` writes the stream as a trainer would order it: its meta message, the whole fixed val
set (so a replay of the file trains: a trainer needs the val set first), then train messages
k = 0 .. M-1 (``--split val``: M val messages, cycling through the set, and no train messages).
    python -m producer inspect FILE

For a mixture ``inspect`` adds ``sources.NAME``: the source's train ``rows``, their ``share`` of
the train rows, its ``target`` share and its ``val_rows``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from itertools import chain
from typing import Any

import numpy as np

from producer.stream import BatchStream
from shared import settings
from shared.batch_stats import CorruptionCounts, corruption_counts
from shared.data_config import DataConfig
from shared.meta import StreamMeta
from shared.recording import RecordingError, RecordingReader, RecordingWriter
from shared.wire import WireError, decode_stream, encode, encode_meta, new_incarnation


def add_command(subparsers: argparse._SubParsersAction) -> None:
    record = subparsers.add_parser("record", help="write a stream to a recording file",
                                   description="Write M messages of a stream to a recording file.")
    record.add_argument("--out", required=True, metavar="FILE", help="recording to write")
    record.add_argument("--messages", type=_positive_int, required=True, metavar="M", help="messages to write")
    record.add_argument("--split", choices=("train", "val"), default="train",
                        help="train: the val set, then M train messages; val: M val messages, cycled (default: train)")
    settings.add_arguments(record, DataConfig, title="data")
    record.set_defaults(handler=run_record, command_parser=record)

    inspect = subparsers.add_parser("inspect", help="summarise a recording as JSON",
                                    description="Print one JSON object describing a recording.")
    inspect.add_argument("file", metavar="FILE", help="recording to read")
    inspect.set_defaults(handler=run_inspect, command_parser=inspect)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def run_record(args: argparse.Namespace) -> int:
    try:
        stream = BatchStream(settings.from_namespace(DataConfig, args))
    except (ValueError, OSError) as error:  # CorpusError, StageError and bad flag combinations
        args.command_parser.error(str(error))
    meta = stream.meta
    val_set = stream.val_set()
    if args.split == "val":
        if meta.val_messages == 0:
            args.command_parser.error("the stream has no val set (--val-fraction 0)")
        messages = (("val", i % len(val_set), val_set[i % len(val_set)]) for i in range(args.messages))
    else:
        messages = chain((("val", i, batch) for i, batch in enumerate(val_set)),
                         (("train", k, batch) for k, batch in zip(range(args.messages), stream.train_batches())))
    info = {"source": "producer record", "producer_id": stream.producer_id, "split": args.split}
    incarnation = new_incarnation()
    with RecordingWriter(args.out, info) as writer:
        writer.write(encode_meta(meta, stream.producer_id, 0, incarnation))
        trained = 0
        for seq, (split, index, batch) in enumerate(messages, start=1):
            writer.write(encode(meta, split, stream.producer_id, seq, batch, index, incarnation=incarnation))
            trained += split == "train"
    written = f"{args.messages} val messages" if args.split == "val" else f"the val set ({len(val_set)}) and {trained} train messages"
    if args.split == "train" and trained < args.messages:
        written += " (the mixture ends there: every source reached its max_epochs)"
    print(f"wrote {written} to {args.out}", file=sys.stderr)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    try:
        reader = RecordingReader(args.file)
    except (RecordingError, OSError) as error:
        args.command_parser.error(str(error))
    with reader:
        print(json.dumps(summarise(reader), indent=2))
    return 0


def summarise(reader: RecordingReader) -> dict[str, Any]:
    """Statistics of every decodable batch of a recording (see :func:`run_inspect`), counted with
    ``shared.batch_stats`` as the trainer counts them."""
    rejected: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    meta = None
    valid_lens, ratios = [], []
    counts = CorruptionCounts()
    block_size = 0
    source_rows = {split: Counter() for split in ("train", "val")}
    for message in decode_stream(reader):
        if isinstance(message, WireError):
            rejected[message.reason] += 1
            continue
        meta = meta or message.meta
        splits[message.split] += 1
        block_size = message.meta.block_size
        valid_lens.append(message.valid_len)
        ratios.append(message.tensors["mask_ratio"])
        counts.add(corruption_counts(message.tensors["x"], message.tensors["y"], message.meta.mask_id, message.meta.ignore_index))
        if "source" in message.tensors:
            source_rows[message.split].update(message.tensors["source"].tolist())
    valid_len = np.concatenate(valid_lens) if valid_lens else np.zeros(0, np.int64)
    ratio = np.concatenate(ratios) if ratios else np.zeros(0, np.float32)
    corruption = counts.percentages()
    report = reader.report
    return {
        "file": reader.path,
        "messages": int(sum(splits.values())),
        "splits": dict(splits),
        "rows": int(valid_len.size),
        "meta": _meta_summary(meta),
        "sources": _sources_summary(meta, source_rows),
        "valid_len": _summary(valid_len, ("mean", "min", "max")),
        "packing_efficiency": float(valid_len.mean() / block_size) if valid_len.size else None,
        "supervised_per_token": counts.supervised / int(valid_len.sum()) if valid_len.size else None,
        "pct_mask": corruption.pct_mask if counts.supervised else None,
        "pct_random": corruption.pct_random if counts.supervised else None,
        "pct_unchanged": corruption.pct_unchanged if counts.supervised else None,
        "mask_ratio": _summary(ratio, ("p10", "p50", "p90")),
        "truncated": report.truncated,
        "lost_bytes": report.lost_bytes,
        "corrupt_records": report.corrupt_records,
        "rejected": int(sum(rejected.values())),
        "rejected_by_reason": dict(rejected),
        "problem": report.problem,
    }


def _meta_summary(meta: StreamMeta | None) -> dict[str, Any] | None:
    """The meta as the diagnostics show it (no vocabulary or counts, which can be large)."""
    return None if meta is None else dataclasses.asdict(meta.summary())


def _sources_summary(meta: StreamMeta | None, rows: dict[str, Counter[int]]) -> dict[str, dict[str, Any]] | None:
    """Per source of a mixture: its train ``rows``, their ``share`` of the train rows, its
    ``target`` share (weight / sum of weights) and its ``val_rows``; None for a single corpus."""
    if meta is None or not meta.sources:
        return None
    train = sum(rows["train"].values())
    total_weight = sum(source.weight for source in meta.sources)
    return {source.name: {"rows": rows["train"][s], "share": rows["train"][s] / train if train else None,
                          "target": source.weight / total_weight, "val_rows": rows["val"][s]}
            for s, source in enumerate(meta.sources)}


def _summary(values: np.ndarray, names: tuple[str, ...]) -> dict[str, float | None]:
    if values.size == 0:
        return dict.fromkeys(names)
    compute = {
        "mean": np.mean, "min": np.min, "max": np.max,
        "p10": lambda v: np.percentile(v, 10), "p50": np.median, "p90": lambda v: np.percentile(v, 90),
    }
    return {name: float(compute[name](values)) for name in names}
