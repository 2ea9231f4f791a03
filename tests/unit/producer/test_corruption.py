"""Corruption (docs/SPEC.md §2.5): candidates, the policies, 80/10/10, and the stage file."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.corruption import Selection, choose_k, corrupt, mask_ratio
from producer.selection import select
from producer.stages import span_select, sticky_select
from shared.corruption import (
    BASELINE_STAGES,
    BertPolicy,
    CorruptionError,
    RandomStage,
    SpanPolicy,
    SpanStage,
    StagesPolicy,
    StickyStage,
    UniformPolicy,
    load_stage_file,
)

BASE = 60  # base ids 0..59
MASK, SEP, PAD = 60, 61, 62
FRACTIONS = (0.8, 0.1, 0.1)


def sigma5(p: float, n: int) -> float:
    """Five standard deviations of an empirical rate with true rate p over n trials."""
    return 5 * math.sqrt(p * (1 - p) / n)


def packed_rows(rng, rows, block_size, supervise_sep=False):
    """Line-packing-shaped rows: base content, [SEP] at valid_len - 1, [PAD] after."""
    valid_len = rng.integers(1, block_size + 1, rows)
    positions = np.arange(block_size)
    x = rng.integers(0, BASE, (rows, block_size)).astype(np.uint16)
    x[positions == (valid_len - 1)[:, None]] = SEP
    x[positions >= valid_len[:, None]] = PAD
    return x, valid_len - 1 + int(supervise_sep)


def runs(row: np.ndarray) -> int:
    """Number of maximal runs of True in a bool row."""
    return int(np.count_nonzero(np.diff(np.concatenate([[0], row.astype(np.int8)])) == 1))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 70))
def test_choose_k_picks_exactly_k_candidates(seed, rows, block_size):
    rng = np.random.default_rng(seed)
    candidates = rng.random((rows, block_size)) < rng.random((rows, 1))
    counts = rng.integers(0, candidates.sum(axis=1) + 1)
    chosen = choose_k(rng, candidates, counts)
    assert not (chosen & ~candidates).any()
    assert (chosen.sum(axis=1) == counts).all()


def test_choose_k_is_uniform_over_the_candidates():
    rng = np.random.default_rng(1)
    rows = 20000
    candidates = np.zeros((rows, 12), bool)
    candidates[:, 2:12] = True
    frequency = choose_k(rng, candidates, np.full(rows, 3)).mean(axis=0)
    assert (frequency[:2] == 0).all()
    assert np.abs(frequency[2:] - 0.3).max() < sigma5(0.3, rows)


POLICIES = {
    "bert": BertPolicy(0.15),
    "uniform": UniformPolicy((0.2, 0.7)),
    "stages": load_stage_file(BASELINE_STAGES),
    "span": SpanPolicy(0.3, 3.0),
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(POLICIES)), st.sampled_from(["train", "val"]), st.booleans(),
       st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(2, 80))
def test_policies_supervise_only_candidates_and_corrupt_by_the_rules(name, split, supervise_sep, seed, rows, block_size):
    rng = np.random.default_rng(seed)
    x, n_candidates = packed_rows(rng, rows, block_size, supervise_sep)
    original = x.copy()
    selection = select(POLICIES[name], rng, n_candidates, block_size, split)
    supervised = selection.supervised
    positions = np.arange(block_size)
    assert not (supervised & (positions >= n_candidates[:, None])).any()
    labels = corrupt(rng, x, selection, FRACTIONS, BASE, MASK)
    assert labels.dtype == np.int16 and x.dtype == np.uint16
    assert (labels[supervised] == original[supervised]).all() and (labels[~supervised] == -100).all()
    assert (x[~supervised] == original[~supervised]).all()
    replaced = supervised & (x != MASK) & (x != original)
    assert (x[replaced] < BASE).all()  # random tokens are base ids, never special
    count = supervised.sum(axis=1)
    ratio = mask_ratio(supervised, n_candidates)
    assert ratio.dtype == np.float32
    assert np.allclose(ratio, np.where(n_candidates > 0, count / np.maximum(n_candidates, 1), 0))
    if name == "uniform":
        assert (count >= np.rint(0.2 * n_candidates)).all() and (count <= np.rint(0.7 * n_candidates)).all()
    if name == "stages":
        stages = getattr(POLICIES["stages"], split)
        assert selection.stage.dtype == np.uint8
        shares = np.bincount(selection.stage, minlength=len(stages))
        assert shares.max() - shares.min() <= 1
        for row, stage in enumerate(stages[i] for i in selection.stage):
            n = n_candidates[row]
            if stage.type == "sticky":
                assert count[row] == min(math.ceil(round(stage.target_masked_ratio * n, 9)), n)
            elif stage.type == "random":
                assert count[row] <= np.rint(stage.max_masked_ratio * n)
            else:
                assert (x[row, supervised[row]] == MASK).all() and runs(supervised[row]) <= stage.spans_count
        assert (selection.mask_only == np.array([stages[i].type == "span" for i in selection.stage])).all()


def test_bert_rate_and_exact_uniform_counts():
    rng = np.random.default_rng(2)
    rows, block_size = 400, 256
    n_candidates = rng.integers(0, block_size + 1, rows)
    supervised = select(BertPolicy(0.15), rng, n_candidates, block_size, "train").supervised
    assert abs(supervised.sum() / n_candidates.sum() - 0.15) < sigma5(0.15, n_candidates.sum())
    supervised = select(UniformPolicy((0.3, 0.3)), rng, n_candidates, block_size, "train").supervised
    assert (supervised.sum(axis=1) == np.rint(0.3 * n_candidates)).all()
    ratios = mask_ratio(select(UniformPolicy((0.0, 1.0)), rng, np.full(4000, 500), 500, "train").supervised, np.full(4000, 500))
    assert abs(ratios.mean() - 0.5) < 5 * math.sqrt(1 / 12 / 4000)


def test_a_random_stage_draws_its_ratio_uniformly_up_to_its_maximum():
    rng = np.random.default_rng(7)
    policy = StagesPolicy(train=(RandomStage(0.6),), val=(RandomStage(0.6),))
    rows, n = 4000, 500
    ratios = mask_ratio(select(policy, rng, np.full(rows, n), n, "train").supervised, np.full(rows, n))
    # U(0, 0.6): mean 0.3, sd 0.6 / sqrt(12); a stage stuck at 0 or at its maximum fails here.
    assert abs(ratios.mean() - 0.3) < 5 * 0.6 / math.sqrt(12 * rows)
    assert ratios.min() < 0.01 and 0.59 < ratios.max() <= 0.6
    assert abs(np.mean(ratios < 0.3) - 0.5) < 5 * math.sqrt(0.25 / rows)


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.5, 0.25, 0.25)])
def test_mask_random_unchanged_fractions(fractions):
    rng = np.random.default_rng(3)
    x = rng.integers(0, BASE, (200, 512)).astype(np.uint16)
    original = x.copy()
    supervised = rng.random(x.shape) < 0.5
    corrupt(rng, x, Selection(supervised), fractions, BASE, MASK)
    n = int(supervised.sum())
    as_mask = (x == MASK) & supervised
    unchanged = (x == original) & supervised
    replaced = supervised & ~as_mask & ~unchanged
    for observed, expected in zip((as_mask, replaced, unchanged), fractions):
        assert abs(observed.sum() / n - expected) < sigma5(expected, n)
    assert (x[replaced] < BASE).all()
    # Random replacements are spread over the other base ids.
    assert len(np.unique(x[replaced])) == BASE


def test_supervised_sep_is_replaced_by_base_tokens_only():
    rng = np.random.default_rng(4)
    x = np.full((1000, 1), SEP, np.uint16)
    labels = corrupt(rng, x, Selection(np.ones((1000, 1), bool)), (0.0, 1.0, 0.0), BASE, MASK)
    assert (labels == SEP).all() and (x < BASE).all() and len(np.unique(x)) == BASE


def test_mask_only_rows_are_all_mask_and_ratio_is_zero_without_candidates():
    rng = np.random.default_rng(5)
    x = rng.integers(0, BASE, (4, 50)).astype(np.uint16)
    supervised = np.ones((4, 50), bool)
    corrupt(rng, x, Selection(supervised, mask_only=np.array([True, False, True, False])), FRACTIONS, BASE, MASK)
    assert (x[[0, 2]] == MASK).all() and not (x[[1, 3]] == MASK).all()
    assert mask_ratio(np.zeros((2, 5), bool), np.array([0, 5])).tolist() == [0.0, 0.0]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 60), st.floats(0.0, 1.0), st.floats(0.01, 1.0), st.floats(0.0, 1.0))
def test_sticky_reaches_exactly_ceil_ratio_n(seed, n, ratio, p1, p2):
    rng = np.random.default_rng(seed)
    n_candidates = np.array([n, n // 2, 0])
    target = np.minimum(np.ceil(ratio * n_candidates - 1e-9).astype(np.int64), n_candidates)
    chosen = sticky_select(rng, n_candidates, 64, target, np.full(3, p1), np.full(3, p2))
    assert (chosen.sum(axis=1) == target).all()
    assert not (chosen & (np.arange(64) >= n_candidates[:, None])).any()


def test_sticky_without_p2_terminates_and_sticky_masks_are_clumped():
    rng = np.random.default_rng(6)
    # p2 = 0: once every gap is flanked nothing can be added; the rest is filled at random.
    chosen = sticky_select(rng, np.full(200, 3), 3, np.full(200, 3), np.full(200, 0.3), np.zeros(200))
    assert chosen.all()
    rows = 300
    sticky = sticky_select(rng, np.full(rows, 400), 400, np.full(rows, 120), np.full(rows, 0.02), np.full(rows, 0.9))
    scattered = choose_k(rng, np.ones((rows, 400), bool), np.full(rows, 120))
    assert np.mean([runs(r) for r in sticky]) < 0.5 * np.mean([runs(r) for r in scattered])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(2, 64))
def test_spans_are_at_most_k_runs_inside_the_candidates(seed, k, block_size):
    rng = np.random.default_rng(seed)
    n_candidates = rng.integers(0, block_size + 1, 20)
    covered = span_select(rng, n_candidates, block_size, np.full(20, k))
    assert not (covered & (np.arange(block_size) >= n_candidates[:, None])).any()
    assert all(runs(row) <= k for row in covered)
    assert (covered.any(axis=1) == (n_candidates > 0)).all()


def test_baseline_stage_file_parses():
    plan = load_stage_file(BASELINE_STAGES)
    assert len(plan.train) == 9 and len(plan.val) == 14
    assert plan.train[0] == StickyStage(0.4, 0.15, 0.3)
    assert plan.train[2] == RandomStage(0.5) and plan.train[3] == SpanStage(20)
    described = plan.to_dict()["stages"]
    assert described["train"][3] == {"type": "span", "spans_count": 20}
    assert isinstance(plan, StagesPolicy)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[train]]\ntype = 'random'\nmax_masked_ratio = 0.5\n", r"\[\[val\]\]"),
        ("[[train]]\ntype = 'blur'\n[[val]]\ntype = 'span'\nspans_count = 2\n", "blur"),
        ("[[train]]\ntype = 'random'\n[[val]]\ntype = 'span'\nspans_count = 2\n", "max_masked_ratio"),
        ("[[train]]\ntype = 'random'\nmax_masked_ratio = 1.5\n[[val]]\ntype = 'span'\nspans_count = 2\n", r"\[0, 1\]"),
        ("[[train]]\ntype = 'span'\nspans_count = 0\n[[val]]\ntype = 'span'\nspans_count = 2\n", "positive"),
        ("[[train]]\ntype='sticky'\ntarget_masked_ratio=0.5\np1_probability=0.0\np2_probability=0.5\n"
         "[[val]]\ntype = 'span'\nspans_count = 2\n", "p1_probability"),
        ("train = [", "not TOML"),
    ],
)
def test_invalid_stage_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "stages.toml"
    path.write_text(text)
    with pytest.raises(CorruptionError, match=message):
        load_stage_file(path)
    with pytest.raises(CorruptionError, match="stage file"):
        load_stage_file(tmp_path / "missing.toml")


def span_runs(row: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of True in a bool row."""
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(2, 200), st.floats(0.01, 1.0), st.floats(1.0, 12.0))
def test_span_masking_reaches_the_ratio_inside_the_content(seed, rows, block_size, ratio, mean):
    rng = np.random.default_rng(seed)
    n_candidates = rng.integers(0, block_size + 1, rows)
    policy = SpanPolicy(ratio, mean)
    supervised = select(policy, rng, n_candidates, block_size, "train").supervised
    assert supervised.shape == (rows, block_size) and supervised.dtype == bool
    # Spans lie inside the candidates.
    assert not (supervised & (np.arange(block_size) >= n_candidates[:, None])).any()
    # The ratio is reached, within one span: exactly round(ratio * n), the last span cut to fit.
    target = np.minimum(np.rint(ratio * n_candidates).astype(np.int64), n_candidates)
    assert (supervised.sum(axis=1) == target).all()
    # Spans are kept apart where the row has room even for single-position spans: then no run
    # is longer than a span can be, and a row of length-1 spans (mean 1) is all runs of 1.
    if mean == 1.0:
        roomy = n_candidates - target >= target - 1
        assert all((span_runs(row) == 1).all() for row in supervised[roomy])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(2, 128))
def test_span_masking_is_a_function_of_the_seed(seed, rows, block_size):
    n_candidates = np.random.default_rng(seed).integers(0, block_size + 1, rows)
    policy = SpanPolicy(0.4, 2.5)
    first = select(policy, np.random.default_rng(seed), n_candidates, block_size, "train").supervised
    again = select(policy, np.random.default_rng(seed), n_candidates, block_size, "val").supervised
    other = select(policy, np.random.default_rng(seed + 1), n_candidates, block_size, "train").supervised
    assert (first == again).all()
    assert (first != other).any() or n_candidates.max() < 4


@pytest.mark.parametrize("mean", [1.0, 3.0, 8.0])
def test_span_lengths_are_geometric_with_the_mean(mean):
    """Long rows at a low ratio: the spans are kept apart and in order, so a row's first run is
    its first span, a plain draw (the later ones are conditioned on fitting the count).
    Geometric(1/mean): mean ``mean``, P(L = 1) = 1/mean."""
    rng = np.random.default_rng(11)
    rows, n = 4000, 1000
    supervised = select(SpanPolicy(0.1, mean), rng, np.full(rows, n), n, "train").supervised
    lengths = np.array([span_runs(row)[0] for row in supervised])
    sd = math.sqrt(mean * (mean - 1)) if mean > 1 else 0.0
    assert abs(lengths.mean() - mean) < 5 * sd / math.sqrt(len(lengths)) + 1e-9
    assert abs(np.mean(lengths == 1) - 1 / mean) < sigma5(1 / mean, len(lengths)) + 1e-9
    # Placement is uniform: the supervised positions cover the row evenly.
    coverage = supervised.mean(axis=0)
    assert abs(coverage[: n // 2].mean() - coverage[n // 2 :].mean()) < 0.01
