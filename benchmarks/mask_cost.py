"""Attention-mask cost: a training step of ``trainer.model.transformer`` with the key-padding mask vs ``attn_mask=None``.

    python benchmarks/mask_cost.py [--blocks 256,1024] [--batch-tokens 8192] [--repeats 7] [--quick]

For each block size, one forward + backward (cross-entropy over the supervised positions, then
``zero_grad``) of the demo model (4 layers x 4 heads x 128, learned positions) on a real Linepack
batch of that block size (built-in corpus, lines packing, bert 15 %: rows end in [SEP] + [PAD]),
``batch-tokens / block`` rows. "masked" is the model as it is (``key_padding_mask`` ->
bool (B, 1, 1, T) into SDPA); "unmasked" is the same step with ``key_padding_mask`` patched to
return ``None``, so SDPA gets ``attn_mask=None`` and the same work is otherwise done.

Two timings, the variants taking turns and each keeping its best of ``--repeats`` steps:

- ``cpu_1thread``: torch on one thread, CPU seconds of the process — hardly moved by other jobs
  on a shared host, so this is the number to compare.
- ``wall_threads``: torch's default thread count, wall-clock seconds (noisy on a shared host).

Prints JSON with the ratio masked / unmasked per block and timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainer.model.transformer as model_module  # noqa: E402
from producer.stream import BatchStream  # noqa: E402
from shared.data_config import DataConfig  # noqa: E402
from trainer.model.losses import supervised_loss  # noqa: E402
from trainer.model.transformer import BidirectionalTransformer, ModelConfig  # noqa: E402


@contextlib.contextmanager
def unmasked():
    """Within: the model builds no mask, so SDPA runs with ``attn_mask=None``."""
    original = model_module.key_padding_mask
    model_module.key_padding_mask = lambda attention_mask: None
    try:
        yield
    finally:
        model_module.key_padding_mask = original


def linepack_batch(block_size: int, rows: int) -> tuple[dict[str, torch.Tensor], int]:
    """One real batch, widened to the trainer's dtypes, and the stream's vocab_size."""
    stream = BatchStream(DataConfig(block_size=block_size, rows_per_message=rows))
    batch = next(stream.train_batches())
    return {name: torch.from_numpy(batch[name].astype("int64")) for name in ("x", "y", "attention_mask")}, stream.meta.vocab_size


def time_variants(model, batch, repeats: int, clock) -> dict[str, float]:
    """Best seconds per step of each variant; the variants alternate so load drifts hit both."""
    def step():
        loss, _ = supervised_loss(model(batch["x"], batch["attention_mask"]), batch["y"])
        loss.backward()
        model.zero_grad(set_to_none=True)

    variants = {"masked": contextlib.nullcontext, "unmasked": unmasked}
    best = dict.fromkeys(variants, math.inf)
    for repeat in range(repeats + 1):
        for name, context in variants.items():
            with context():
                started = clock()
                step()
                if repeat:  # the first round warms up
                    best[name] = min(best[name], clock() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="256,1024", help="block sizes, comma-separated")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="rows x block per step")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant; the best is reported")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 1 repeat (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.batch_tokens, args.repeats, args.n_layer, args.n_embd = "64,128", 512, 1, 1, 32
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    results = []
    for block_size in (int(b) for b in args.blocks.split(",")):
        batch, vocab_size = linepack_batch(block_size, max(args.batch_tokens // block_size, 1))
        config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                             positions="learned")  # as measured in docs/BENCHMARKS.md (the default is now rotary)
        model = BidirectionalTransformer(config)
        row = {"block_size": block_size, "rows": batch["x"].shape[0],
               "mean_valid_len": round(float(batch["attention_mask"].sum(dim=1).float().mean()), 1)}
        for timing, threads, clock in (("cpu_1thread", 1, time.process_time), ("wall_threads", default_threads, time.perf_counter)):
            torch.set_num_threads(threads)
            best = time_variants(model, batch, args.repeats, clock)
            row[timing] = {"masked_ms": round(1e3 * best["masked"], 1), "unmasked_ms": round(1e3 * best["unmasked"], 1),
                           "ratio": round(best["masked"] / best["unmasked"], 3), "threads": threads}
        torch.set_num_threads(default_threads)
        results.append(row)
    print(json.dumps({
        "model": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd}, "batch_tokens": args.batch_tokens,
        "repeats": args.repeats, "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
