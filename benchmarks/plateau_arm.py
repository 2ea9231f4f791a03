"""One arm of ``trainer.compare`` in this process, for exploring what moves the plateau (docs/PLATEAU.md).

    python benchmarks/plateau_arm.py --corpus data/tinyshakespeare.txt --packing fixed --policy uniform
        --block-size 256 --batch-size 16 --max-iters 600 --eval-interval 50 [any data, training or model flag]
        [--out DIR] [--quick]

The real ``Trainer`` on the batches of the real producer ``BatchStream``, with no
processes or sockets: the same batches, model, seed and steps as that arm of
``python -m trainer.compare`` with the same flags (its val curve matches the compare arm's), at
half the cost of a compare run and none of its start-up. The flags are the producer's and the
trainer's own (``--positions``, ``--lr``, ``--ratio-range`` ...); ``--seed`` seeds data and
training, as in compare; live eval samples are off. torch runs on one thread. Prints one JSON
line: the val curve (own val set), the context-free floor, the first eval at least ``--margin``
nats under it (``never``) and the final val loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.stream import BatchStream  # noqa: E402
from shared import settings  # noqa: E402
from shared.batch_stats import MaskRatioHistogram  # noqa: E402
from shared.data_config import DataConfig  # noqa: E402
from trainer.data.assembly import BatchAssembler, val_set_batches  # noqa: E402
from trainer.data.device import to_device  # noqa: E402
from trainer.data.source import KnownStream  # noqa: E402
from trainer.data.stats import StreamStats  # noqa: E402
from trainer.diagnostics.floor import context_free_floor  # noqa: E402
from trainer.loop.config import TrainConfig  # noqa: E402
from trainer.loop.observers import METRICS_NAME  # noqa: E402
from trainer.loop.train import Trainer  # noqa: E402
from trainer.model.transformer import ModelConfig  # noqa: E402


class InProcessSource(KnownStream):
    """The BatchSource methods the Trainer uses, over a producer BatchStream: train messages in
    k order cut into batches of ``batch_size`` rows by the consumer's own BatchAssembler, the val
    set by its ``val_set_batches``, tensors widened by ``to_device`` (every tensor the stream
    carries, ``stage`` included)."""

    def __init__(self, stream: BatchStream, batch_size: int) -> None:
        self.meta = stream.meta
        self.batch_size = batch_size
        self.last_batch_stats = None
        self.cumulative_mask_ratio = MaskRatioHistogram()
        self._messages = stream.train_batches()
        val = dict(enumerate(stream.val_set()))
        self._val = [to_device(CPU, batch) for batch in val_set_batches(val, tuple(val[0]), batch_size)]
        self._assembler: BatchAssembler | None = None
        self._ready: list[dict[str, np.ndarray]] = []
        self.consumed = 0

    def next_batch(self, split="train", timeout=None):
        while not self._ready:
            message = next(self._messages)
            if self._assembler is None:
                self._assembler = BatchAssembler(self.batch_size, message)
            self._ready.extend(arrays for arrays, _ in self._assembler.add(message, None))
        self.consumed += 1
        return to_device(CPU, self._ready.pop(0))

    def stats(self) -> StreamStats:
        return StreamStats(consumed_batches=self.consumed, seconds_since_last_message=0.0, val_messages_seen=len(self._val),
                           val_messages_total=self.meta.val_messages, meta_digest=self.meta.digest)


CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--margin", type=float, default=0.1, help="nats under the floor that count as leaving it")
    parser.add_argument("--out", default=None, help="the run folder (none: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="tiny model and block, a few steps (smoke test)")
    settings.add_arguments(parser, DataConfig, skip=("producer_id",), title="data")
    settings.add_arguments(parser, TrainConfig, skip=("out_dir", "resume", "seed", "threads", "eval_samples", "device"), title="training")
    settings.add_arguments(parser, ModelConfig, title="model")
    args = parser.parse_args(argv)
    if args.quick:
        args.block_size, args.rows_per_message, args.batch_size, args.max_iters, args.eval_interval = 32, 8, 8, 6, 3
        args.n_layer, args.n_head, args.n_embd, args.warmup_iters = 1, 2, 32, 2
    torch.set_num_threads(1)
    data = settings.from_namespace(DataConfig, args, producer_id="0")
    stream = BatchStream(data)
    floor = context_free_floor(stream.meta, "val")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        train = settings.from_namespace(TrainConfig, args, out_dir=out, seed=data.seed, eval_samples=0, device="cpu")
        started = time.monotonic()
        trainer = Trainer(train, settings.from_namespace(ModelConfig, args), InProcessSource(stream, train.batch_size))
        trainer.prepare(wait_timeout=5)
        trainer.run()
        with open(os.path.join(out, METRICS_NAME), encoding="utf-8") as file:
            evals = [record for record in map(json.loads, file) if record["kind"] == "eval" and not record["before_training"]]
    curve = [[record["step"], round(record["val_loss"], 4)] for record in evals]
    leave = next((step for step, loss in curve if loss <= floor - args.margin), None)
    print(json.dumps({"packing": data.packing, "block_size": data.block_size, "batch_size": train.batch_size,
                      "seed": data.seed, "argv": sys.argv[1:] if argv is None else argv, "floor": round(floor, 4),
                      "leave_step": "never" if leave is None else leave, "final_val": curve[-1][1],
                      "wall_s": round(time.monotonic() - started), "val": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
