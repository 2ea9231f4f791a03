"""Feeding a training loop: Linepack producers over ZeroMQ vs a torch DataLoader running the HF collator.

    python benchmarks/feeding.py [--warmup-steps 20] [--steps 150] [--threads 1] [--quick]

The same model (the demo configuration of ``python -m trainer.stack``: 4 layers x 4 heads x 128,
batch 32 x block 128, built-in corpus, bert 15 % 80/10/10), the same training step as
``trainer.loop.train.Trainer`` (forward + loss, backward, gradient clipping at 1.0, AdamW from
``trainer.loop.train.make_optimizer``, ``loss.item()`` every step as on CPU), on CPU, fed by:

- ``linepack N producer(s)``: N real ``python -m producer run --connect ...`` processes
  (``--block-size 128 --rows-per-message 16``) into the real ``trainer.data.consumer.DatasetConsumer``;
  the loop calls ``next_batch("train")``.
- ``dataloader num_workers=W + hf collator``: ``torch.utils.data.DataLoader`` (batch 32, shuffle,
  ``num_workers`` W, persistent workers) over a map-style dataset of pre-tokenized, pre-packed
  rows (Linepack's own line-packed rows, uncorrupted, each a dict of Python lists with
  ``attention_mask`` and a precomputed ``special_tokens_mask``, as a 🤗 ``datasets`` Dataset
  yields them), collated by ``transformers.DataCollatorForLanguageModeling`` (bert 15 %,
  80/10/10, ``return_tensors="pt"``); ``mask_ratio`` is added for the loss signature.

Steady state: after ``--warmup-steps`` steps, ``--steps`` steps are timed. ``data_wait`` is the
time the loop is blocked getting the next batch, as a fraction of the wall time of the timed
steps (the trainer's ``data_wait_fraction``, in per cent), with the per-step median, p99 and max; ``steps_per_s``
over the same window. The training step runs on ``--threads`` torch threads (default 1: on a
2-core host that also runs the producers or the DataLoader workers, two intra-op threads
oversubscribe the cores). The configurations run one after another (each from a fresh model),
so a shared host's load can differ between them: the load average is recorded with each.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from hf_collator import hf_collator, hf_tokenizer, prepacked  # noqa: E402

from producer.stream import BatchStream  # noqa: E402
from shared.data_config import DataConfig  # noqa: E402
from shared.vocab import IGNORE_INDEX  # noqa: E402
from trainer.data.consumer import DatasetConsumer  # noqa: E402
from trainer.loop.config import TrainConfig  # noqa: E402
from trainer.loop.schedule import make_optimizer  # noqa: E402
from trainer.model.losses import supervised_loss  # noqa: E402
from trainer.model.transformer import BidirectionalTransformer, ModelConfig  # noqa: E402

DEMO_BLOCK_SIZE, DEMO_ROWS_PER_MESSAGE, DEMO_BATCH_SIZE = 128, 16, 32  # trainer.stack's defaults
DEMO_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128}
WAIT_S = 60.0  # longest wait for meta or a batch before a configuration fails


class TrainingLoop:
    """The Trainer's step on a fresh model; :meth:`run` times it with batches from ``next_batch()``."""

    def __init__(self, vocab_size: int, block_size: int, model_args: dict) -> None:
        torch.manual_seed(0)
        self.config = TrainConfig(out_dir="", device="cpu")
        self.model = BidirectionalTransformer(ModelConfig(vocab_size=vocab_size, block_size=block_size, **model_args))
        self.optimizer = make_optimizer(self.model, self.config, torch.device("cpu"))

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss, _ = supervised_loss(self.model(batch["x"], batch["attention_mask"]), batch["y"], batch["mask_ratio"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, next_batch, warmup_steps: int, steps: int) -> dict:
        for _ in range(warmup_steps):
            self.step(next_batch())
        load_before = os.getloadavg()
        waits, losses = [], []
        started = time.perf_counter()
        for _ in range(steps):
            asked = time.perf_counter()
            batch = next_batch()
            waits.append(time.perf_counter() - asked)
            losses.append(self.step(batch))
        elapsed = time.perf_counter() - started
        waited = sum(waits)
        p50, p99 = np.percentile(waits, [50, 99]) * 1e3
        shape = tuple(batch["x"].shape)
        if not all(np.isfinite(losses)):
            raise RuntimeError(f"non-finite loss: {losses}")
        return {
            "batch_shape": shape, "steps": steps, "steps_per_s": round(steps / elapsed, 2),
            "ms_per_step": round(1e3 * elapsed / steps, 2), "data_wait_ms_per_step": round(1e3 * waited / steps, 3),
            "data_wait_ms_p50": round(p50, 3), "data_wait_ms_p99": round(p99, 3), "data_wait_ms_max": round(1e3 * max(waits), 3),
            "data_wait_pct": round(100 * waited / elapsed, 3), "final_loss": round(losses[-1], 3),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
        }


def start_producer(endpoint: str, producer_id: int, producer_args: tuple[str, ...]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "producer", "run", "--connect", endpoint, "--producer-id", str(producer_id),
         "--status-every", "3600", *producer_args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def feed_linepack(producers: int, args) -> dict:
    with DatasetConsumer("tcp://127.0.0.1:*", args.batch_size) as consumer:
        processes = [start_producer(consumer.endpoint, k, args.producer_args) for k in range(producers)]
        try:
            meta = consumer.wait_for_meta(timeout=WAIT_S)
            loop = TrainingLoop(meta.vocab_size, meta.block_size, args.model)
            result = loop.run(lambda: consumer.next_batch("train", timeout=WAIT_S), args.warmup_steps, args.steps)
            stats = consumer.stats()
        finally:
            stop(processes)
    result["stream"] = {"gaps": stats.gaps, "duplicates": stats.duplicates, "rejected_total": stats.rejected_total}
    return {"feed": f"linepack {producers} producer{'s' if producers > 1 else ''}", **result}


class PackedRows(torch.utils.data.Dataset):
    """Pre-tokenized, pre-packed rows as a 🤗 Dataset yields them: dicts of Python lists."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


class TrainerCollate:
    """The HF collator, renamed to the trainer's batch keys (``mask_ratio``: supervised / candidates)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(examples)
        supervised = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
        candidates = (batch["attention_mask"].sum(dim=1) - 1).clamp(min=1)
        return {"x": batch["input_ids"], "y": batch["labels"], "attention_mask": batch["attention_mask"],
                "mask_ratio": (supervised / candidates).float()}


def dataset_rows(stream: BatchStream, rows: int) -> list[dict[str, list[int]]]:
    """``rows`` uncorrupted line-packed rows from ``stream``, with their masks, as lists."""
    batches = stream.train_batches()
    out = []
    while len(out) < rows:
        packed = prepacked(next(batches), stream.tokenizer.base_size)
        out += [{name: array[i].tolist() for name, array in packed.items()} for i in range(len(packed["input_ids"]))]
    return out[:rows]


def feed_dataloader(workers: int, stream: BatchStream, rows: list, args) -> dict:
    collate = TrainerCollate(hf_collator(hf_tokenizer(stream.tokenizer), "bert", "pt"))
    loader = torch.utils.data.DataLoader(
        PackedRows(rows), batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        num_workers=workers, persistent_workers=workers > 0,
    )

    def batches(loader=loader):
        while True:
            yield from loader

    iterator = batches()
    loop = TrainingLoop(stream.meta.vocab_size, stream.meta.block_size, args.model)
    result = loop.run(lambda: next(iterator), args.warmup_steps, args.steps)
    iterator.close()  # with the loader's last reference gone, its workers shut down
    del loader
    return {"feed": f"dataloader num_workers={workers} + hf collator", **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150, help="timed steps per configuration")
    parser.add_argument("--producers", default="1,2", help="Linepack producer counts to run")
    parser.add_argument("--workers", default="0,2", help="DataLoader num_workers values to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the training step (0 = torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.block_size, args.rows_per_message, args.batch_size = DEMO_BLOCK_SIZE, DEMO_ROWS_PER_MESSAGE, DEMO_BATCH_SIZE
    args.model = dict(DEMO_MODEL)
    if args.quick:
        args.warmup_steps, args.steps, args.block_size, args.rows_per_message, args.batch_size = 2, 5, 64, 4, 4
        args.model = {"n_layer": 1, "n_head": 2, "n_embd": 32}
    args.producer_args = ("--block-size", str(args.block_size), "--rows-per-message", str(args.rows_per_message))
    results = [feed_linepack(int(n), args) for n in args.producers.split(",") if n]
    skipped = None
    try:
        import transformers  # noqa: F401
    except ImportError:
        skipped = "transformers is not installed (pip install '.[bench]'): DataLoader + HF collator paths skipped"
    if skipped is None and args.workers:
        stream = BatchStream(DataConfig(block_size=args.block_size, rows_per_message=args.rows_per_message))
        rows = dataset_rows(stream, 64 if args.quick else 8192)
        results += [feed_dataloader(int(w), stream, rows, args) for w in args.workers.split(",")]
    print(json.dumps({
        "model": args.model, "batch_size": args.batch_size, "producer_args": " ".join(args.producer_args),
        "warmup_steps": args.warmup_steps, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "skipped": skipped, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
