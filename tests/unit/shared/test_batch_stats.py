"""shared.batch_stats: per-batch numbers on hand-checked rows, and the fixed-bin histogram."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.batch_stats import MaskRatioHistogram, mask_ratio_counts, valid_lengths
from shared.batch_stats import batch_statistics as typed_batch_statistics

from helpers.wire import make_meta, make_tensors

MASK, SEP, PAD, IGNORE = 5, 6, 7, -100


def batch_statistics(x, y, attention_mask, mask_ratio, mask_id, ignore_index):
    """The shared statistics of a batch as a plain dict, valid_len taken from ``attention_mask``."""
    stats = typed_batch_statistics(x, y, valid_lengths(attention_mask), mask_ratio, mask_id, ignore_index)
    return dataclasses.asdict(stats)


def test_batch_statistics_on_a_hand_built_batch():
    # Row 0: content "0 1 2 3", [SEP], 3 pads; supervised: pos 0 as [MASK], pos 1 as random 4, pos 2 unchanged.
    # Row 1: content "1 2", [SEP], 5 pads; supervised: pos 1 as [MASK].
    x = np.array(
        [[MASK, 4, 2, 3, SEP, PAD, PAD, PAD],
         [1, MASK, SEP, PAD, PAD, PAD, PAD, PAD]], dtype=np.uint16)
    y = np.full((2, 8), IGNORE, dtype=np.int16)
    y[0, :3] = [0, 1, 2]
    y[1, 1] = 2
    mask = (x != PAD).astype(np.uint8)
    ratio = np.array([3 / 4, 1 / 2], dtype=np.float32)

    stats = batch_statistics(x, y, mask, ratio, mask_id=MASK, ignore_index=IGNORE)

    assert stats["rows"] == 2
    assert stats["valid_len"] == {"mean": 4.0, "min": 3, "max": 5, "p50": 4.0}
    assert stats["supervised_per_token"] == pytest.approx(4 / 8)  # 4 supervised over 8 visible
    assert stats["supervised_per_position"] == pytest.approx(4 / 16)  # ... over all 16 positions
    assert stats["corruption"]["pct_mask"] == pytest.approx(50.0)
    assert stats["corruption"]["pct_random"] == pytest.approx(25.0)
    assert stats["corruption"]["pct_unchanged"] == pytest.approx(25.0)
    assert stats["mask_ratio"]["p50"] == pytest.approx(0.625)
    assert stats["mask_ratio"]["p10"] == pytest.approx(0.525)


def test_batch_statistics_without_supervision_is_all_zero():
    x = np.array([[1, 2, SEP, PAD]], dtype=np.uint16)
    stats = batch_statistics(x, np.full((1, 4), IGNORE, np.int16), (x != PAD).astype(np.uint8), np.zeros(1, np.float32), MASK, IGNORE)
    assert stats["supervised_per_token"] == 0.0
    assert stats["corruption"] == {"pct_mask": 0.0, "pct_random": 0.0, "pct_unchanged": 0.0}


def test_mask_ratio_counts_puts_edges_in_range():
    counts = mask_ratio_counts(np.array([0.0, 0.0004, 0.5, 0.9999, 1.0], dtype=np.float32), bins=1000)
    assert counts.shape == (1000,)
    assert counts.sum() == 5
    assert counts[0] == 2 and counts[500] == 1 and counts[999] == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=400), st.integers(1, 5))
def test_histogram_percentiles_match_numpy_within_a_bin(values, splits):
    histogram = MaskRatioHistogram()
    for part in np.array_split(np.array(values, dtype=np.float32), splits):
        histogram.add(part)
    assert histogram.count == len(values)
    for q, got in zip([0, 10, 50, 90, 100], histogram.percentiles([0, 10, 50, 90, 100])):
        # Histogram percentiles may differ from numpy's by interpolation between
        # neighbouring samples, but never by more than the samples around the rank plus a bin.
        ordered = np.sort(np.array(values, dtype=np.float64))
        rank = q / 100 * len(values)
        low = ordered[max(int(np.ceil(rank)) - 1, 0)]
        high = ordered[min(int(np.floor(rank)), len(values) - 1)]
        assert low - 1e-3 - 1e-9 <= got <= high + 1e-3 + 1e-9


def test_histogram_memory_is_bounded_and_empty_is_nan():
    histogram = MaskRatioHistogram()
    assert all(np.isnan(histogram.percentiles([10, 50])))
    rng = np.random.default_rng(0)
    for _ in range(50):
        histogram.add(rng.random(1000))
    assert histogram.counts.shape == (1000,)
    assert histogram.count == 50_000
    p10, p50, p90 = histogram.percentiles([10, 50, 90])
    assert p10 == pytest.approx(0.1, abs=0.02) and p50 == pytest.approx(0.5, abs=0.02) and p90 == pytest.approx(0.9, abs=0.02)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(2, 64))
def test_batch_statistics_match_a_plain_numpy_reference(seed, rows, block_size):
    meta = make_meta(block_size=block_size)
    t = make_tensors(meta, rows, np.random.default_rng(seed))
    stats = batch_statistics(t["x"], t["y"], t["attention_mask"], t["mask_ratio"], meta.mask_id, meta.ignore_index)

    valid_len = t["attention_mask"].sum(1)
    supervised = t["y"] != meta.ignore_index
    inputs, originals = t["x"][supervised].astype(int), t["y"][supervised].astype(int)
    n = max(len(inputs), 1)
    assert stats["valid_len"]["p50"] == pytest.approx(np.median(valid_len))
    assert stats["valid_len"]["mean"] == pytest.approx(valid_len.mean())
    assert stats["supervised_per_token"] == pytest.approx(supervised.sum() / valid_len.sum())
    assert stats["corruption"]["pct_mask"] == pytest.approx(100 * (inputs == meta.mask_id).sum() / n)
    assert stats["corruption"]["pct_unchanged"] == pytest.approx(100 * (inputs == originals).sum() / n)
    random = (inputs != meta.mask_id) & (inputs != originals)
    assert stats["corruption"]["pct_random"] == pytest.approx(100 * random.sum() / n)
    expected = np.percentile(t["mask_ratio"].astype(np.float64), [10, 50, 90])
    assert [stats["mask_ratio"][k] for k in ("p10", "p50", "p90")] == pytest.approx(expected.tolist())
