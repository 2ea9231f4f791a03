"""Small line-packed, corrupted batches for the trainer tests, built without the producer.

``SyntheticStream(text, block_size, batch_size, seed)`` packs lines of ``text`` the way
docs/SPEC.md §2.3 says ([SEP] after the content, [PAD] after it, attention_mask 1 up to [SEP]) and
corrupts them with the ``uniform`` policy at 80/10/10, as torch tensors in the consumer's
dtypes. It is plain Python: fine for a few thousand rows, not a producer.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.meta import StreamMeta
from shared.vocab import IGNORE_INDEX, Vocabulary

WORDS = "the quick brown fox jumps over a lazy dog and then sleeps in the warm sun".split()
# Lines of 1 to 9 words, so rows end with [SEP] and padding at many different lengths.
TEXT = "\n".join(" ".join(WORDS[i % 7 : i % 7 + 1 + (i * 5) % 9]) for i in range(64))


def make_meta(text: str = TEXT, block_size: int = 64, rows_per_message: int = 8, val_messages: int = 2) -> StreamMeta:
    vocabulary = Vocabulary.from_text(text)
    counts = np.bincount(vocabulary.encode(text), minlength=vocabulary.base_size)
    return StreamMeta.build(
        vocabulary,
        {"policy": "uniform", "ratio_range": [0.0, 1.0], "mask_fractions": [0.8, 0.1, 0.1]},
        counts,
        block_size=block_size,
        rows_per_message=rows_per_message,
        packing="lines",
        sampling="random",
        seed=0,
        corpus_fingerprint="0" * 16,
        val_messages=val_messages,
    )


class SyntheticStream:
    """An endless, seeded stream of batches from the lines of ``text``."""

    def __init__(self, text: str = TEXT, block_size: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        self.meta = make_meta(text, block_size)
        self.vocabulary = self.meta.vocabulary
        self.lines = [self.vocabulary.encode(line + "\n") for line in text.split("\n")]
        self.block_size = block_size
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """x, y, attention_mask (T,) and the mask ratio of one packed, corrupted row."""
        T, v = self.block_size, self.vocabulary
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


class ReadyStream:
    """The DatasetConsumer methods the Trainer calls before training, for in-process fakes whose
    meta and val batches are known up front: ``self.meta`` and ``self._val`` set by the subclass."""

    meta: StreamMeta
    _val: list[dict[str, torch.Tensor]]

    def wait_for_meta(self, timeout=None):
        return self.meta

    def wait_for_val_set(self, timeout=None):
        return True

    def val_batches(self):
        return self._val
