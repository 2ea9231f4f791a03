"""Synthetic torch batch streams and in-process fakes of the consumer, for the trainer tests.

``SyntheticStream(text, block_size, batch_size, seed)`` packs lines of ``text`` the way
docs/SPEC.md §2.3 says ([SEP] after the content, [PAD] after it, attention_mask 1 up to [SEP]) and
corrupts them with the ``uniform`` policy at 80/10/10, as torch tensors in the consumer's
dtypes. It is plain Python: fine for a few thousand rows, not a producer.

``mixture_meta`` makes the stream's meta a mixture of two sources of its lines;
``FakeConsumer`` (a ``trainer.data.source.KnownStream``) stands in for a DatasetConsumer in process (no sockets);
``make_trainer`` builds a tiny Trainer over one; ``invert_key_padding_mask`` injects the
inverted-mask bug of docs/SPEC.md §9.1.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import torch

import trainer.model.transformer
from shared.batch_stats import MaskRatioHistogram, batch_statistics, mask_ratio_counts, valid_lengths
from shared.meta import StreamMeta, mixed_counts, mixture_fingerprint
from shared.mixture import SourceInfo
from shared.vocab import IGNORE_INDEX
from trainer.data.source import KnownStream
from trainer.data.stats import ProducerRow, StreamStats
from trainer.loop.config import TrainConfig
from trainer.loop.train import Trainer
from trainer.model.transformer import ModelConfig

from helpers.wire import make_meta

WORDS = "the quick brown fox jumps over a lazy dog and then sleeps in the warm sun".split()
# Lines of 1 to 9 words, so rows end with [SEP] and padding at many different lengths.
TEXT = "\n".join(" ".join(WORDS[i % 7 : i % 7 + 1 + (i * 5) % 9]) for i in range(64))
UNIFORM = {"policy": "uniform", "ratio_range": [0.0, 1.0], "mask_fractions": [0.8, 0.1, 0.1]}
TINY_MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=32)
GATE_TIMEOUT_S = 10.0  # how long a FakeConsumer waits for a closed gate to open


def mixture_meta(meta: StreamMeta, texts: dict[str, str], weights: dict[str, float], max_epochs: dict[str, int] | None = None,
                 epoch_rows: int = 0) -> StreamMeta:
    """``meta`` (of a char tokenizer that covers every text) made a mixture of the sources ``texts``
    (name -> its text, whose unigram counts it gets) with ``weights``; ``epoch_rows`` (then epoch
    sampling) and ``max_epochs`` per source."""
    tokenizer = meta.tokens
    sources = tuple(SourceInfo(name, weights[name], f"{place:016x}", (max_epochs or {}).get(name, 0), epoch_rows,
                               np.bincount(tokenizer.encode(text), minlength=tokenizer.base_size).astype("<u8").tobytes())
                    for place, (name, text) in enumerate(texts.items(), start=1))
    return dataclasses.replace(meta, sources=sources, corpus_fingerprint=mixture_fingerprint(sources),
                               token_counts=mixed_counts(sources).astype("<u8").tobytes(),
                               sampling="epoch" if epoch_rows else "random")


def halves(text: str = TEXT) -> dict[str, str]:
    """Two sources of ``text``: ``code`` its even lines, ``prose`` its odd lines."""
    lines = text.split("\n")
    return {"code": "\n".join(lines[0::2]), "prose": "\n".join(lines[1::2])}


class SyntheticStream:
    """An endless, seeded stream of batches from the lines of ``text``."""

    def __init__(self, text: str = TEXT, block_size: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        self.meta = make_meta(block_size, rows_per_message=8, val_messages=2, text=text, corruption=UNIFORM,
                              corpus_fingerprint="0" * 16)
        self.tokenizer = self.meta.tokens
        self.lines = [self.tokenizer.encode(line + "\n") for line in text.split("\n")]
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """x, y, attention_mask (T,) and the mask ratio of one packed, corrupted row."""
        T, v = self.block_size, self.tokenizer
        start = int(self.rng.integers(len(self.lines)))
        content: list[int] = []
        for line in self.lines[start:]:
            if content and len(content) + len(line) > T - 1:
                break
            content.extend(line.tolist())
        content = content[: T - 1]
        n = len(content)
        x = np.full(T, v.pad_id, dtype=np.int64)
        x[:n] = content
        x[n] = v.sep_id
        attention_mask = np.zeros(T, dtype=np.int64)
        attention_mask[: n + 1] = 1
        y = np.full(T, IGNORE_INDEX, dtype=np.int64)
        chosen = self.rng.permutation(n)[: int(round(self.rng.uniform() * n))]
        y[chosen] = x[chosen]
        kind = self.rng.uniform(size=len(chosen))
        x[chosen[kind < 0.8]] = v.mask_id
        randomised = chosen[(kind >= 0.8) & (kind < 0.9)]
        x[randomised] = self.rng.integers(v.base_size, size=len(randomised))
        return x, y, attention_mask, len(chosen) / n

    def batch(self) -> dict[str, torch.Tensor]:
        rows = [self.row() for _ in range(self.batch_size)]
        return {
            "x": torch.from_numpy(np.stack([r[0] for r in rows])),
            "y": torch.from_numpy(np.stack([r[1] for r in rows])),
            "attention_mask": torch.from_numpy(np.stack([r[2] for r in rows])),
            "mask_ratio": torch.tensor([r[3] for r in rows], dtype=torch.float32),
        }

    def batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        return [self.batch() for _ in range(n)]




class FakeConsumer(KnownStream):
    """The DatasetConsumer interface over a SyntheticStream, with the real batch statistics and
    histogram, StreamStats as the consumer makes them, and a gate that can block next_batch."""

    def __init__(self, block_size: int = 48, batch_size: int = 8, seed: int = 0) -> None:
        self.stream = SyntheticStream(block_size=block_size, batch_size=batch_size, seed=seed)
        self.meta = self.stream.meta
        self._val = self.stream.batches(2)
        self.last_batch_stats = None
        self.cumulative_mask_ratio = MaskRatioHistogram()
        self.ratios_seen: list[np.ndarray] = []
        self.consumed = 0
        self.rejected = {"meta_mismatch": 0, "dtype": 0}
        self.last_message = time.monotonic()
        self.gate = threading.Event()
        self.gate.set()
        self.blocked = threading.Event()

    def next_batch(self, split="train", timeout=None):
        if not self.gate.is_set():
            self.blocked.set()
            assert self.gate.wait(GATE_TIMEOUT_S), "the test never opened the gate"
        batch = self.stream.batch()
        arrays = {name: tensor.numpy() for name, tensor in batch.items()}
        self.last_batch_stats = batch_statistics(
            arrays["x"], arrays["y"], valid_lengths(arrays["attention_mask"]), arrays["mask_ratio"], self.meta.mask_id,
            self.meta.ignore_index
        )
        self.cumulative_mask_ratio.add_counts(mask_ratio_counts(arrays["mask_ratio"]))
        self.ratios_seen.append(arrays["mask_ratio"])
        self.consumed += 1
        self.last_message = time.monotonic()
        return batch

    def stats(self):
        total_rejected = sum(self.rejected.values())
        return StreamStats(
            received=self.consumed + total_rejected, accepted=self.consumed, rejected=dict(self.rejected),
            rejected_total=total_rejected, consumed_messages=self.consumed, consumed_batches=self.consumed,
            gaps=1, duplicates=0, out_of_order=0,
            producers={"p0": ProducerRow(messages=self.consumed + 3, meta=1, train=self.consumed, val=2, first_seq=0,
                                         last_seq=self.consumed + 3, gaps=1, duplicates=0, out_of_order=0,
                                         seconds_since_last=0.0)},
            starved=False, seconds_since_last_message=round(time.monotonic() - self.last_message, 3),
            queue_depth=2, val_messages_seen=2, val_messages_total=2, meta_digest=self.meta.digest,
        )


def make_trainer(tmp_path, consumer, diagnostics, max_iters=30, eval_interval=10) -> Trainer:
    """A prepared Trainer of :data:`TINY_MODEL` over ``consumer``, with ``diagnostics`` observing it."""
    config = TrainConfig(out_dir=str(tmp_path), batch_size=8, max_iters=max_iters, eval_interval=eval_interval,
                         log_interval=5, device="cpu", lr=3e-3, warmup_iters=5, seed=1)
    run = Trainer(config, TINY_MODEL, consumer, [diagnostics])
    run.prepare(wait_timeout=5)
    return run


def invert_key_padding_mask(monkeypatch) -> None:
    """Pass SDPA the padding mask (True = [PAD]) where it wants True = may attend: the §9.1 bug."""
    correct = trainer.model.transformer.key_padding_mask
    monkeypatch.setattr(trainer.model.transformer, "key_padding_mask", lambda attention_mask: ~correct(attention_mask))
