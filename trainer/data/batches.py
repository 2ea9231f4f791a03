"""Train messages, in k order, into the batches the training loop takes (the receive thread's assembly side).

:class:`TrainBatches` cuts the rows of train messages into batches of exactly ``batch_size``
rows (:class:`~trainer.data.assembly.BatchAssembler`), converts them for the device, computes
their statistics at a bounded rate, and stamps each with the schedule's :class:`Cursor` after it
and, for a mixture, its rows per source. The :class:`~trainer.data.intake.Intake` decides what
reaches it and when; this module only builds batches.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.batch_stats import BatchStats, batch_statistics, mask_ratio_counts
from shared.meta import StreamMeta
from shared.wire import WireMessage, tensor_dtypes, tensor_names
from trainer.data.assembly import BatchAssembler
from trainer.data.device import HostBatch
from trainer.data.orders import Cursor

# Batch statistics are for people and dashboards: computed for every batch while batches come
# slower than this, else for the first batch after each such interval (bounded cost at any rate).
STATS_EVERY_S = 0.05
VALID_LEN = "valid_len"  # the assembler's name for the decoder's per-row valid_len


@dataclass
class ReadyBatch:
    host: HostBatch  # see trainer.data.device.host_tensor
    stats: BatchStats | None  # None when skipped (see STATS_EVERY_S)
    ratio_counts: np.ndarray
    new_messages: list[tuple[str, Any]]  # per message starting in this batch: (producer id, its frames when recording, else None)
    cursor: Cursor  # where the schedule stands once the training loop has this batch
    source_rows: np.ndarray | None = None  # rows per source index (len(meta.sources),) of a mixture's batch


def source_rows_before(meta: StreamMeta, cursor: Cursor, rank: int, world: int) -> np.ndarray:
    """Rows per source (len(meta.sources),) that this rank counts as taken before ``cursor`` (a
    resumed run), from the mixture's row -> source assignment: rank 0 the whole messages before
    every rank's cursor, each rank the rows it used of its next message; summed over the ranks,
    the rows the run had taken."""
    mixture, rows = meta.mixture, meta.rows_per_message
    start = (rank + cursor.position * world) * rows
    counts = np.bincount(mixture.assign(start, start + cursor.rows_used)[0], minlength=len(meta.sources))
    return counts + (mixture.counts_before(cursor.position * world * rows) if rank == 0 else 0)


class TrainBatches:
    """Batches of ``batch_size`` rows from the train messages of the pinned ``meta``, as
    :class:`ReadyBatch` in :attr:`ready` (oldest first).

    Args:
        to_host: (wire array, vocab_size) -> host tensor (pinned on CUDA), in the receive thread.
        recording: keep each message's frames in its tag (the consumer records what it hands out).
        world: data-parallel ranks (the cursor's world size).
    """

    def __init__(self, meta: StreamMeta, batch_size: int, to_host: Callable[[np.ndarray, int], Any], recording: bool,
                 world: int) -> None:
        self.meta = meta
        self.batch_size = batch_size
        self.ready: collections.deque[ReadyBatch] = collections.deque()
        dtypes = tensor_dtypes(meta)
        templates = {name: np.empty((1, meta.block_size) if name in ("x", "y", "attention_mask") else (1,), dtypes[name])
                     for name in tensor_names(meta)}
        self._assembler = BatchAssembler(batch_size, {**templates, VALID_LEN: np.empty(1, np.int64)})
        self._to_host = to_host
        self._recording = recording
        self._world = world
        self._stats_at = float("-inf")  # when batch statistics were last computed
        self._rows_handed = 0  # train rows assembled since the start cursor (its rows included)

    def start(self, cursor: Cursor) -> None:
        """The schedule starts at ``cursor``: the batches' cursors count on from there."""
        self._rows_handed = cursor.position * self.meta.rows_per_message + cursor.rows_used

    def add(self, message: WireMessage, skip: int) -> None:
        """The next train message in k order, less its first ``skip`` rows (used before a resume)."""
        meta = self.meta
        tag = (message.producer_id, message.frames if self._recording else None)
        arrays = {**message.tensors, VALID_LEN: message.valid_len}
        if skip:
            arrays = {name: array[skip:] for name, array in arrays.items()}
        for batch, tags in self._assembler.add(arrays, tag):
            valid_len = batch.pop(VALID_LEN)
            now = time.monotonic()
            stats = None
            if now - self._stats_at >= STATS_EVERY_S:
                self._stats_at = now
                stats = batch_statistics(batch["x"], batch["y"], valid_len, batch["mask_ratio"], meta.mask_id, meta.ignore_index)
            self._rows_handed += self.batch_size
            position, rows_used = divmod(self._rows_handed, meta.rows_per_message)
            source_rows = np.bincount(batch["source"], minlength=len(meta.sources)) if "source" in batch else None
            self.ready.append(ReadyBatch(host={name: self._to_host(array, meta.vocab_size) for name, array in batch.items()},
                                         stats=stats, ratio_counts=mask_ratio_counts(batch["mask_ratio"]), new_messages=tags,
                                         cursor=Cursor(position, rows_used, self._world), source_rows=source_rows))
