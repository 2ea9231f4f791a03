"""The context-free floor: exact value against brute force, and the Shakespeare figure of docs/SPEC.md §6."""

from __future__ import annotations

import numpy as np
import pytest

from shared.corruption import SpanStage
from shared.tokenizer import CharTokenizer
from trainer.diagnostics.floor import context_free_floor, corrupted_token_entropy, entropy, stage_floors

from helpers import SHAKESPEARE
from helpers.wire import make_meta


def text_meta(text: str, corruption: dict, block_size: int = 64, packing: str = "lines"):
    """A one-val-message meta whose vocabulary and token counts come from ``text``."""
    return make_meta(block_size, 4, packing=packing, val_messages=1, text=text, corruption=corruption, corpus_fingerprint="0" * 16)


def corrupt(originals: np.ndarray, base_size: int, fractions, rng: np.random.Generator) -> np.ndarray:
    """Inputs for supervised originals under (m, r, u): [MASK] (``base_size + 1000``), another
    base token (uniform over the others), or unchanged."""
    m, r, _ = fractions
    draw = rng.random(originals.shape)
    inputs = originals.copy()
    inputs[draw < m] = base_size + 1000
    replaced = (draw >= m) & (draw < m + r)
    others = rng.integers(0, base_size - 1, replaced.sum())
    inputs[replaced] = others + (others >= originals[replaced])
    return inputs


def empirical_cross_entropy(fit_pairs, test_pairs, classes: int) -> float:
    """CE on ``test_pairs`` of the empirical posterior q(c | i) fitted on ``fit_pairs``."""
    (fit_c, fit_i), (test_c, test_i) = fit_pairs, test_pairs
    inputs = np.unique(np.concatenate([fit_i, test_i]))
    fit_col, test_col = np.searchsorted(inputs, fit_i), np.searchsorted(inputs, test_i)
    counts = np.zeros((classes, len(inputs)))
    np.add.at(counts, (fit_c, fit_col), 1.0)
    posterior = counts / counts.sum(axis=0, keepdims=True)
    return float(-np.log(posterior[test_c, test_col]).mean())


SMALL_TEXT = "aaaaaaaabbbbccd\n" * 3 + "abcabcaaab\n"


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (0.0, 0.5, 0.5), (1.0, 0.0, 0.0)])
def test_floor_matches_monte_carlo_of_the_optimal_predictor(fractions):
    meta = text_meta(SMALL_TEXT, {"policy": "bert", "mask_prob": 0.15, "mask_fractions": list(fractions)})
    tokens = meta.tokens.encode(SMALL_TEXT).astype(np.int64)
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(2):
        originals = rng.choice(tokens, 400_000)
        pairs.append((originals, corrupt(originals, meta.tokens.base_size, fractions, rng)))
    simulated = empirical_cross_entropy(pairs[0], pairs[1], meta.tokens.base_size)
    assert context_free_floor(meta) == pytest.approx(simulated, abs=0.005)


def test_stage_mix_matches_monte_carlo_over_rows():
    """Rows shared among stages, supervised counts per stage, spans pure [MASK], pooled CE."""
    stages = [
        {"type": "random", "max_masked_ratio": 0.5},
        {"type": "sticky", "target_masked_ratio": 0.9, "p1_probability": 0.1, "p2_probability": 0.9},
        {"type": "span", "spans_count": 3},
    ]
    corruption = {"policy": "stages", "mask_fractions": [0.6, 0.2, 0.2], "stages": {"train": stages, "val": stages[:1]}}
    meta = text_meta(SMALL_TEXT, corruption)
    tokens = meta.tokens.encode(SMALL_TEXT).astype(np.int64)
    base_size, candidates, rows_per_stage = meta.tokens.base_size, meta.block_size - 1, 6000
    rng = np.random.default_rng(1)
    originals, inputs = [], []
    for row in range(rows_per_stage * len(stages)):
        stage = stages[row % len(stages)]
        if stage["type"] == "random":
            count = round(rng.uniform(0, stage["max_masked_ratio"]) * candidates)
        elif stage["type"] == "sticky":
            count = int(np.ceil(stage["target_masked_ratio"] * candidates))
        else:  # the union of k inclusive spans between 2k sorted integer points
            points = np.sort(rng.integers(0, candidates, 2 * stage["spans_count"]))
            covered = np.zeros(candidates + 1, dtype=np.int64)
            np.add.at(covered, points[0::2], 1)
            np.add.at(covered, points[1::2] + 1, -1)
            count = int((np.cumsum(covered)[:candidates] > 0).sum())
        row_originals = rng.choice(tokens, count)
        originals.append(row_originals)
        if stage["type"] == "span":
            inputs.append(np.full(count, base_size + 1000))
        else:
            inputs.append(corrupt(row_originals, base_size, (0.6, 0.2, 0.2), rng))
    originals, inputs = np.concatenate(originals), np.concatenate(inputs)
    half = len(originals) // 2
    simulated = empirical_cross_entropy((originals[:half], inputs[:half]), (originals[half:], inputs[half:]), base_size)
    assert context_free_floor(meta) == pytest.approx(simulated, abs=0.01)
    weights = [weight for weight, _ in stage_floors(meta)]
    ratios = np.array([0.25, np.ceil(0.9 * candidates) / candidates, SpanStage(3).expected_ratio(candidates)])
    assert weights == pytest.approx(ratios / ratios.sum())
    # The val split has only the random stage: the plain 60/20/20 floor.
    assert context_free_floor(meta, "val") == pytest.approx(
        corrupted_token_entropy(np.bincount(tokens) / len(tokens), base_size, (0.6, 0.2, 0.2))
    )


@pytest.mark.parametrize("spans, candidates", [(1, 5), (3, 10), (20, 1023)])
def test_span_coverage_matches_enumeration_and_its_large_n_limit(spans, candidates):
    rng = np.random.default_rng(spans)
    points = np.sort(rng.integers(0, candidates, (100_000 // spans, 2 * spans)), axis=1)
    position = np.arange(candidates)[None, None, :]
    covered = ((points[:, 0::2, None] <= position) & (position <= points[:, 1::2, None])).any(axis=1)
    assert SpanStage(spans).expected_ratio(candidates) == pytest.approx(covered.mean(), abs=0.004)
    assert SpanStage(spans).expected_ratio(2_000_000) == pytest.approx(spans / (2 * spans + 1), abs=3e-5)


def test_floor_matches_the_real_producer_stream():
    """Supervised (label, input) pairs from producer.stream.BatchStream, fitted and scored."""
    stream_module = pytest.importorskip("producer.stream")
    config_module = pytest.importorskip("shared.data_config")
    corpus_module = pytest.importorskip("producer.corpus")
    text = "".join(f"{'ab' * (i % 5)}{'c' * (i % 3)}d{'ee' * (i % 2)}\n" for i in range(400))
    corpus = corpus_module.Corpus(text=text, name="test", fingerprint="0" * 16)
    for policy in ("bert", "stages", "span"):
        config = config_module.DataConfig(block_size=48, rows_per_message=64, policy=policy, mask_prob=0.4, mask_fractions=(0.5, 0.3, 0.2))
        stream = stream_module.BatchStream(config, corpus)
        batches = stream.train_batches()
        labels, inputs = [], []
        for _ in range(300):
            batch = next(batches)
            supervised = batch["y"] != -100
            labels.append(batch["y"][supervised].astype(np.int64))
            inputs.append(batch["x"][supervised].astype(np.int64))
        labels, inputs = np.concatenate(labels), np.concatenate(inputs)
        half = len(labels) // 2
        simulated = empirical_cross_entropy((labels[:half], inputs[:half]), (labels[half:], inputs[half:]), stream.meta.vocab_size)
        assert context_free_floor(stream.meta) == pytest.approx(simulated, abs=0.02), policy


def test_limits_all_mask_is_unigram_entropy_and_all_unchanged_is_zero():
    meta = text_meta(SMALL_TEXT, {"policy": "uniform", "ratio_range": [0, 1], "mask_fractions": [1, 0, 0]})
    counts = np.asarray(meta.counts, dtype=float)
    assert context_free_floor(meta) == pytest.approx(entropy(counts / counts.sum()))
    unchanged = text_meta(SMALL_TEXT, {"policy": "bert", "mask_prob": 0.15, "mask_fractions": [0, 0, 1]})
    assert context_free_floor(unchanged) == pytest.approx(0.0, abs=1e-12)


def test_supervised_sep_is_one_more_class_with_the_given_share():
    plain = text_meta(SMALL_TEXT, {"policy": "bert", "mask_prob": 0.15, "mask_fractions": [1, 0, 0]})
    with_sep = text_meta(
        SMALL_TEXT, {"policy": "bert", "mask_prob": 0.15, "mask_fractions": [1, 0, 0], "supervise_sep": True}
    )
    base = entropy(np.asarray(plain.counts, dtype=float) / plain.counts.sum())
    share = 0.1
    mixed = -share * np.log(share) - (1 - share) * np.log(1 - share) + (1 - share) * base
    assert context_free_floor(with_sep, sep_share=share) == pytest.approx(mixed)
    assert context_free_floor(with_sep) > context_free_floor(plain)  # default share 1 / block_size
    fixed = text_meta(
        SMALL_TEXT, {"policy": "bert", "mask_prob": 0.15, "mask_fractions": [1, 0, 0], "supervise_sep": True},
        packing="fixed",
    )
    assert context_free_floor(fixed) == pytest.approx(base)  # fixed windows have no [SEP]


def test_tinyshakespeare_at_80_10_10_is_about_3_07_nats():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    train = "".join(lines[: int(len(lines) * 0.9)])
    vocabulary = CharTokenizer.from_text(text)
    counts = np.bincount(vocabulary.encode(train), minlength=vocabulary.base_size)  # the train lines only
    meta = make_meta(1024, 16, val_messages=1, text=text, token_counts=counts, corpus_fingerprint="0" * 16,
                     corruption={"policy": "bert", "mask_prob": 0.15, "mask_fractions": [0.8, 0.1, 0.1]})
    assert context_free_floor(meta) == pytest.approx(3.07, abs=0.005)
