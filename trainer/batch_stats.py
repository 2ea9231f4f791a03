"""Batch statistics (SPEC §6) from the wire's numpy arrays, and the mask-ratio histogram.

Pure numpy: the consumer runs these in its receive thread, off the training thread.
All inputs are one batch: ``x`` (B, T) token ids as sent (after corruption), ``y`` (B, T)
labels (``ignore_index`` where not supervised), ``attention_mask`` (B, T) with 1 = real
token, ``mask_ratio`` (B,) per-row supervised / candidates.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

MASK_RATIO_BINS = 1000  # fixed bins over [0, 1]: percentiles are exact to 1/2000


def mask_ratio_counts(mask_ratio: np.ndarray, bins: int = MASK_RATIO_BINS) -> np.ndarray:
    """Counts of ``mask_ratio`` values in ``bins`` equal bins over [0, 1] (1.0 goes in the last), int64 (bins,)."""
    index = np.minimum((np.asarray(mask_ratio, dtype=np.float64) * bins).astype(np.int64), bins - 1)
    return np.bincount(np.maximum(index, 0), minlength=bins)


def batch_statistics(x: np.ndarray, y: np.ndarray, attention_mask: np.ndarray, mask_ratio: np.ndarray, mask_id: int, ignore_index: int) -> dict:
    """The per-batch numbers of SPEC §6 as a JSON-able dict.

    Keys: ``rows``; ``valid_len`` {mean, min, max, p50} (tokens per row, [SEP] included);
    ``supervised_per_token`` (supervised / visible positions); ``supervised_per_position``
    (supervised / all B*T positions); ``corruption`` {pct_mask, pct_random, pct_unchanged}
    (percent of supervised positions whose input is [MASK] / neither [MASK] nor the
    original / the original); ``mask_ratio`` {p10, p50, p90} over the rows of the batch.
    """
    valid_len = np.add.reduce(attention_mask, axis=1, dtype=np.int64)  # 0/1 values; faster than count_nonzero(axis=1)
    supervised = y != ignore_index
    n_supervised = int(np.count_nonzero(supervised))
    n_visible = int(valid_len.sum())
    n_mask = int(np.count_nonzero((x == mask_id) & supervised))
    # Ids are below 32767 (shared.vocab.MAX_VOCAB_SIZE), so uint16 ids compare exactly as int16;
    # an unsupervised label is ignore_index < 0, which no id equals.
    n_unchanged = int(np.count_nonzero((x.view(np.int16) if x.dtype == np.uint16 else x) == y))
    share = 100.0 / n_supervised if n_supervised else 0.0
    p10, p50, p90 = _percentiles(mask_ratio, (10, 50, 90))
    return {
        "rows": int(x.shape[0]),
        "valid_len": {
            "mean": float(valid_len.mean()),
            "min": int(valid_len.min()),
            "max": int(valid_len.max()),
            "p50": _percentiles(valid_len, (50,))[0],
        },
        "supervised_per_token": n_supervised / n_visible if n_visible else 0.0,
        "supervised_per_position": n_supervised / x.size if x.size else 0.0,
        "corruption": {
            "pct_mask": n_mask * share,
            "pct_random": (n_supervised - n_mask - n_unchanged) * share,
            "pct_unchanged": n_unchanged * share,
        },
        "mask_ratio": {"p10": float(p10), "p50": float(p50), "p90": float(p90)},
    }


def _percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (linear interpolation) without its per-call overhead; zeros when empty."""
    if len(values) == 0:
        return [0.0] * len(qs)
    ordered = np.sort(values.astype(np.float64))
    position = np.asarray(qs, dtype=np.float64) / 100.0 * (len(ordered) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(ordered) - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)).tolist()


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

    def to_dict(self) -> dict:
        p10, p50, p90 = self.percentiles([10, 50, 90])
        return {"count": self.count, "p10": p10, "p50": p50, "p90": p90}
