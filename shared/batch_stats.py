"""Batch statistics (docs/SPEC.md §6) from the wire's numpy arrays, and the mask-ratio histogram.

Pure numpy, shared by the trainer's consumer (in its receive thread, per batch) and
``producer inspect`` (over a whole recording), so both count the same way. Inputs are rows
of one stream: ``x`` (R, T) token ids as sent (after corruption), ``y`` (R, T) labels
(``ignore_index`` where not supervised), ``valid_len`` (R,) real tokens per row
(:attr:`shared.wire.WireMessage.valid_len`, computed once per message by the decoder),
``mask_ratio`` (R,) per-row supervised / candidates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

MASK_RATIO_BINS = 1000  # fixed bins over [0, 1]: percentiles are exact to 1/2000


@dataclass(frozen=True)
class ValidLen:
    """Real tokens per row ([SEP] included)."""

    mean: float
    min: int
    max: int
    p50: float


@dataclass(frozen=True)
class Corruption:
    """Percent of supervised positions whose input is [MASK] / another token / the original."""

    pct_mask: float
    pct_random: float
    pct_unchanged: float


@dataclass(frozen=True)
class Percentiles:
    p10: float | None
    p50: float | None
    p90: float | None


@dataclass(frozen=True)
class CumulativePercentiles(Percentiles):
    count: int  # rows accumulated


@dataclass(frozen=True)
class BatchStats:
    """The per-batch numbers of docs/SPEC.md §6.

    ``supervised_per_token``: supervised / visible positions; ``supervised_per_position``:
    supervised / all R*T positions; ``mask_ratio``: p10/p50/p90 over the rows.
    """

    rows: int
    valid_len: ValidLen
    supervised_per_token: float
    supervised_per_position: float
    corruption: Corruption
    mask_ratio: Percentiles


@dataclass
class CorruptionCounts:
    """Supervised positions and how their inputs were corrupted; counts add up over batches."""

    supervised: int = 0
    mask: int = 0  # input is [MASK]
    unchanged: int = 0  # input is the original token

    def add(self, other: CorruptionCounts) -> None:
        self.supervised += other.supervised
        self.mask += other.mask
        self.unchanged += other.unchanged

    def percentages(self) -> Corruption:
        """Zeros when nothing is supervised."""
        share = 100.0 / self.supervised if self.supervised else 0.0
        random = self.supervised - self.mask - self.unchanged
        return Corruption(pct_mask=self.mask * share, pct_random=random * share, pct_unchanged=self.unchanged * share)


def valid_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """int64 (R,): real tokens per row of a 0/1 ``attention_mask`` (R, T)."""
    return np.add.reduce(attention_mask, axis=1, dtype=np.int64)  # faster than count_nonzero(axis=1)


def corruption_counts(x: np.ndarray, y: np.ndarray, mask_id: int, ignore_index: int) -> CorruptionCounts:
    """How the supervised positions (``y != ignore_index``) of ``x`` were corrupted."""
    supervised = y != ignore_index
    n_mask = int(np.count_nonzero((x == mask_id) & supervised))
    # An unsupervised label is ignore_index < 0, which no id equals, so no mask is needed.
    # Labels hold the same values as ids (both below vocab_size), so a same-width view compares
    # exactly and avoids numpy's widening of mixed-sign comparisons.
    same_width = x.view(y.dtype) if x.dtype.itemsize == y.dtype.itemsize else x
    n_unchanged = int(np.count_nonzero(same_width == y))
    return CorruptionCounts(supervised=int(np.count_nonzero(supervised)), mask=n_mask, unchanged=n_unchanged)


def batch_statistics(
    x: np.ndarray, y: np.ndarray, valid_len: np.ndarray, mask_ratio: np.ndarray, mask_id: int, ignore_index: int
) -> BatchStats:
    """The numbers of one batch (see :class:`BatchStats`)."""
    counts = corruption_counts(x, y, mask_id, ignore_index)
    n_visible = int(valid_len.sum())
    p10, p50, p90 = percentiles(mask_ratio, (10, 50, 90))
    return BatchStats(
        rows=int(x.shape[0]),
        valid_len=ValidLen(mean=float(valid_len.mean()), min=int(valid_len.min()), max=int(valid_len.max()),
                           p50=percentiles(valid_len, (50,))[0]),
        supervised_per_token=counts.supervised / n_visible if n_visible else 0.0,
        supervised_per_position=counts.supervised / x.size if x.size else 0.0,
        corruption=counts.percentages(),
        mask_ratio=Percentiles(p10=p10, p50=p50, p90=p90),
    )


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (linear interpolation) without its per-call overhead; zeros when empty."""
    if len(values) == 0:
        return [0.0] * len(qs)
    ordered = np.sort(values.astype(np.float64))
    position = np.asarray(qs, dtype=np.float64) / 100.0 * (len(ordered) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(ordered) - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)).tolist()


def mask_ratio_counts(mask_ratio: np.ndarray, bins: int = MASK_RATIO_BINS) -> np.ndarray:
    """Counts of ``mask_ratio`` values in ``bins`` equal bins over [0, 1] (1.0 goes in the last), int64 (bins,)."""
    index = np.minimum((np.asarray(mask_ratio, dtype=np.float64) * bins).astype(np.int64), bins - 1)
    return np.bincount(np.maximum(index, 0), minlength=bins)


class MaskRatioHistogram:
    """Fixed-bin histogram of mask ratios over [0, 1]: bounded memory, whatever the run length.

    ``add_counts`` accumulates a batch's :func:`mask_ratio_counts`; ``percentiles`` is
    computed only when asked, linearly interpolated inside the bin that holds it.
    """

    def __init__(self, bins: int = MASK_RATIO_BINS) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)

    @property
    def count(self) -> int:
        """Number of rows accumulated so far."""
        return int(self.counts.sum())

    def add_counts(self, counts: np.ndarray) -> None:
        self.counts += counts

    def add(self, mask_ratio: np.ndarray) -> None:
        self.add_counts(mask_ratio_counts(mask_ratio, self.bins))

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        """The ``qs`` percentiles (0..100) of everything added; NaN for each when empty."""
        qs = list(qs)
        total = self.count
        if total == 0:
            return [float("nan")] * len(qs)
        cumulative = np.cumsum(self.counts)
        result = []
        for q in qs:
            rank = q / 100.0 * total
            # The first bin whose cumulative count reaches the rank (for q = 0: the first non-empty bin).
            b = int(min(np.searchsorted(cumulative, rank, side="left" if rank > 0 else "right"), self.bins - 1))
            below = cumulative[b] - self.counts[b]
            inside = (rank - below) / self.counts[b] if self.counts[b] else 0.0
            result.append(float((b + min(max(inside, 0.0), 1.0)) / self.bins))
        return result

    def summary(self) -> CumulativePercentiles | None:
        """p10/p50/p90 and the row count; None before the first row."""
        if self.count == 0:
            return None
        p10, p50, p90 = self.percentiles([10, 50, 90])
        return CumulativePercentiles(p10=p10, p50=p50, p90=p90, count=self.count)
