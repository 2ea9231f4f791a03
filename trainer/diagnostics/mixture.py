"""The mix of a mixture stream, per source: rows taken, achieved share against the target, epochs.

The rows come from the ``source`` tensor of the train batches handed to the training loop
(``StreamStats.rows_by_source``, summed over the data-parallel ranks); the weights, epoch sizes
and epoch limits from the stream meta (``StreamMeta.sources``). Nothing here exists for a
single corpus.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.meta import StreamMeta


@dataclass(frozen=True)
class SourceNumbers:
    """One source of the mixture.

    Attributes:
        target_share: its weight over the sum of the weights (the share of rows it should get).
        rows: train rows of this source handed to the training loop.
        share: ``rows`` over every source's rows (None before any row).
        epoch_rows: rows in one epoch of this source (0: not known, no epochs counted).
        epochs_completed: ``rows // epoch_rows`` (None when ``epoch_rows`` is 0).
        max_epochs: the epochs it may give (None: no limit).
        exhausted: it has given ``max_epochs`` epochs.
    """

    target_share: float
    rows: int
    share: float | None
    epoch_rows: int
    epochs_completed: int | None
    max_epochs: int | None
    exhausted: bool


def source_numbers(meta: StreamMeta, rows_by_source: Mapping[str, int]) -> dict[str, SourceNumbers]:
    """Source name -> its numbers, in the meta's source order; empty for a single corpus."""
    total_weight = sum(source.weight for source in meta.sources)
    total_rows = sum(rows_by_source.get(source.name, 0) for source in meta.sources)
    numbers = {}
    for source in meta.sources:
        rows = int(rows_by_source.get(source.name, 0))
        epochs = rows // source.epoch_rows if source.epoch_rows else None
        max_epochs = source.max_epochs or None
        numbers[source.name] = SourceNumbers(
            target_share=source.weight / total_weight, rows=rows, share=rows / total_rows if total_rows else None,
            epoch_rows=source.epoch_rows, epochs_completed=epochs, max_epochs=max_epochs,
            exhausted=max_epochs is not None and epochs is not None and epochs >= max_epochs,
        )
    return numbers
