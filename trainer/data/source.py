"""What the training loop and the diagnostics need from a stream of batches.

:class:`BatchSource` is the interface ``trainer.data.consumer.DatasetConsumer`` implements;
tests and benchmarks feed the trainer from other sources with the same methods; those whose
meta and val batches are known up front start from :class:`KnownStream`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from shared.batch_stats import BatchStats, MaskRatioHistogram
from shared.meta import StreamMeta
from trainer.data.orders import Cursor
from trainer.data.stats import StreamStats

# x, y, attention_mask int64 (B, T); mask_ratio float32 (B,); stage int64 (B,) with stages;
# source int64 (B,), the index into meta.sources, for a mixture.
Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    endpoint: str
    meta: StreamMeta | None
    last_batch_stats: BatchStats | None  # of the latest handed-out batch that has them
    cumulative_mask_ratio: MaskRatioHistogram  # every row handed out so far
    cursor: Cursor  # the schedule's cursor after the last batch handed out

    def wait_for_meta(self, timeout: float | None = None) -> StreamMeta: ...
    def wait_for_val_set(self, timeout: float | None = None) -> bool: ...
    def val_batches(self) -> list[Batch]: ...
    def seek(self, cursor: Cursor) -> None: ...
    def next_batch(self, split: str = "train", timeout: float | None = None) -> Batch: ...
    def stats(self) -> StreamStats: ...


class KnownStream:
    """The BatchSource methods the trainer calls before training, for an in-process source whose
    meta and val batches are known up front (``self.meta`` and ``self._val``, set by the
    subclass). ``seek`` keeps the cursor it is given: such a source decides itself what its
    batches depend on."""

    meta: StreamMeta
    _val: list[Batch]
    cursor: Cursor = Cursor()

    def seek(self, cursor: Cursor) -> None:
        self.cursor = cursor

    def wait_for_meta(self, timeout: float | None = None) -> StreamMeta:
        return self.meta

    def wait_for_val_set(self, timeout: float | None = None) -> bool:
        return True

    def val_batches(self) -> list[Batch]:
        return self._val
