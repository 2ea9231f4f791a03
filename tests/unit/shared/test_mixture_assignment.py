"""Mixtures: the row -> source assignment, the sources in the meta, the source tensor (docs/PROTOCOL.md §4.4)."""

import hashlib
from fractions import Fraction

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.limits import MAX_MIXTURE_PERIOD, MAX_MIXTURE_STEPS, MAX_SOURCES
from shared.meta import MetaError, StreamMeta, canonical_json, mixture_fingerprint
from shared.mixture import Mixture, MixtureError, MixtureExhausted, Period, SourceInfo, weight_parts
from shared.wire import WireError, decode, encode, encode_meta

from helpers.wire import make_meta, make_tensors


def _period_at_most(weights, limit):
    try:
        return sum(weight_parts(weights)) <= limit
    except MixtureError:
        return False


# Weights as users write them: decimals with a few digits, or small integers (periods kept short: fast).
weights_strategy = st.lists(
    st.one_of(st.integers(1, 40).map(float), st.integers(1, 999).map(lambda n: n / 1000)), min_size=1, max_size=9,
).filter(lambda w: _period_at_most(w, 5000))


def _sources(weights, max_epochs=None, epoch_rows=0):
    return [SourceInfo(f"s{i}", w, f"{i:016x}", (max_epochs or [0] * len(weights))[i], epoch_rows, b"\0" * 8)
            for i, w in enumerate(weights)]


def _replay(parts, n):
    """Tijdeman's rule step by step, in fractions: the sources of rows 0..n-1 (an independent reference)."""
    m, total = len(parts), sum(parts)
    shares = [Fraction(p, total) for p in parts]
    delta = Fraction(1, 2 * m - 2) if m > 1 else None
    counts, order = [0] * m, []
    for t in range(1, n + 1):
        if m == 1:
            order.append(0)
            continue
        eligible = [s for s in range(m) if t * shares[s] - counts[s] >= delta]
        best = min(eligible, key=lambda s: ((counts[s] + 1 - delta) / shares[s], s))
        order.append(best)
        counts[best] += 1
    return order


@settings(max_examples=60, deadline=None)
@given(weights=weights_strategy)
def test_after_every_number_of_rows_each_source_is_within_one_row_of_its_target(weights):
    mixture = Mixture(_sources(weights))
    period = mixture.period
    n = np.arange(3 * period.size + 5)
    counts = period.counts_before(n)
    shares = np.array(weights) / sum(weights)
    assert (counts.sum(axis=1) == n).all()
    assert np.abs(counts - n[:, None] * shares[None, :]).max() < 1
    assert (np.diff(counts, axis=0) >= 0).all()


@settings(max_examples=40, deadline=None)
@given(weights=weights_strategy.filter(lambda w: _period_at_most(w, 400)), data=st.data())
def test_the_period_is_tijdemans_rule_and_any_range_equals_the_prefix(weights, data):
    mixture = Mixture(_sources(weights))
    parts = weight_parts(weights)
    reference = _replay(list(parts), 2 * sum(parts) + 3)
    whole, whole_index = mixture.assign(0, len(reference))
    assert whole.tolist() == reference
    # each row's index within its source counts that source's earlier rows
    assert whole_index.tolist() == [reference[:i].count(s) for i, s in enumerate(reference)]
    start = data.draw(st.integers(0, len(reference) - 1))
    stop = data.draw(st.integers(start, len(reference)))
    source, index = mixture.assign(start, stop)
    assert source.tolist() == whole[start:stop].tolist() and index.tolist() == whole_index[start:stop].tolist()
    assert mixture.counts_before(start).tolist() == [reference[:start].count(s) for s in range(len(weights))]


def test_a_range_far_out_costs_no_replay_and_agrees_with_the_counts():
    mixture = Mixture(_sources([0.2, 0.8]))
    k = 10**9
    source, index = mixture.assign(k, k + 64)
    before = mixture.counts_before(k)
    assert before.tolist() == [2 * 10**8, 8 * 10**8]
    for s in range(2):
        assert index[source == s].tolist() == list(range(before[s], before[s] + int((source == s).sum())))
    assert (mixture.counts_before(k + 64) - before).tolist() == np.bincount(source, minlength=2).tolist()


def test_megatrons_greedy_rule_would_break_the_bound_where_this_one_holds():
    period = Period(weight_parts([1, 596, 442, 823, 9, 9, 1, 1]))
    n = np.arange(period.size + 1)
    assert np.abs(period.counts_before(n) - n[:, None] * period.parts / period.size).max() <= 1 - 1 / 14


def test_weights_are_exact_decimals_and_the_period_is_bounded():
    assert weight_parts([0.2, 0.8]) == (1, 4)
    assert weight_parts([0.3, 0.7]) == (3, 7)
    assert weight_parts([2, 2, 2]) == (1, 1, 1)
    with pytest.raises(MixtureError, match="round them"):
        weight_parts([0.123457, 0.9])


def test_a_source_with_max_epochs_drops_out_and_the_stream_ends_with_the_last():
    # 3 rows an epoch, 2 epochs: source a has 6 rows in all, b 3.
    mixture = Mixture(_sources([0.5, 0.5], max_epochs=[2, 1], epoch_rows=3))
    source, index = mixture.assign(0, mixture.end)
    assert mixture.end == 9
    assert np.bincount(source).tolist() == [6, 3]
    assert source[6:].tolist() == [0, 0, 0]  # b was exhausted after 6 rows; a alone goes on
    assert index[source == 0].tolist() == list(range(6))
    assert mixture.exhausted(5).tolist() == [False, False] and mixture.exhausted(6).tolist() == [False, True]
    assert mixture.exhausted(9).tolist() == [True, True]
    assert mixture.epochs_completed(6).tolist() == [1, 1]
    with pytest.raises(MixtureExhausted):
        mixture.assign(8, 10)


def test_an_unlimited_source_keeps_the_stream_going():
    mixture = Mixture(_sources([0.25, 0.75], max_epochs=[1, 0], epoch_rows=4))
    assert mixture.end is None
    source, _ = mixture.assign(0, 100)
    assert int((source == 0).sum()) == 4 and source[20:].tolist() == [1] * 80


# ---- the meta and the wire ----


def test_a_mixture_meta_round_trips_and_its_digest_is_the_canonical_json_of_its_plain_form():
    meta = make_meta(sources={"code": 0.2, "prose": 0.8})
    assert StreamMeta.from_dict(meta.to_dict()) == meta
    assert decode(encode_meta(meta, "p", 0)).meta == meta
    assert hashlib.sha256(canonical_json(meta.to_dict()).encode()).hexdigest()[:16] == meta.digest
    assert [s.name for s in meta.summary().sources] == ["code", "prose"]


def test_a_single_corpus_meta_has_no_sources_key():
    meta = make_meta()
    assert "sources" not in meta.to_wire() and "sources" not in meta.to_dict()
    assert meta.mixture is None


def test_other_weights_are_a_difference_named_by_source_and_field():
    meta = make_meta(sources={"code": 0.2, "prose": 0.8})
    other = make_meta(sources={"code": 0.3, "prose": 0.7})
    assert other.corpus_fingerprint != meta.corpus_fingerprint
    assert meta.differences(other)[0] == ("sources.code.weight", 0.2, 0.3)


def test_a_meta_whose_fingerprint_does_not_cover_its_sources_is_refused():
    data = make_meta(sources={"code": 0.2, "prose": 0.8}).to_dict()
    data["sources"][0]["weight"] = 0.5
    with pytest.raises(MetaError, match="corpus_fingerprint"):
        StreamMeta.from_dict(data)
    data["sources"][0]["name"] = "Bad Name"
    with pytest.raises(MetaError, match="sources"):
        StreamMeta.from_dict(data)


def _batch_frames(meta, tensors):
    return encode(meta, "train", "p", 1, tensors, 0)


def test_the_source_tensor_is_validated():
    meta = make_meta(sources={"code": 0.2, "prose": 0.8})
    single = make_meta()
    rng = np.random.default_rng(0)
    metas = {meta.digest: meta, single.digest: single}
    tensors = make_tensors(meta, meta.rows_per_message, rng)
    assert decode(_batch_frames(meta, tensors), metas).tensors["source"].dtype == np.uint8
    with pytest.raises(WireError, match="source"):
        decode(_batch_frames(meta, {k: v for k, v in tensors.items() if k != "source"}), metas)
    with pytest.raises(WireError, match="outside"):
        decode(_batch_frames(meta, {**tensors, "source": np.full(meta.rows_per_message, 2, np.uint8)}), metas)
    plain = make_tensors(single, single.rows_per_message, rng)
    with pytest.raises(WireError, match="only a mixture"):
        decode(_batch_frames(single, {**plain, "source": np.zeros(single.rows_per_message, np.uint8)}), metas)


def test_binary_values_outside_token_counts_stay_refused_in_a_mixture_meta():
    meta = make_meta(sources={"code": 0.2, "prose": 0.8})
    header, body = encode_meta(meta, "p", 0)
    data = msgpack.unpackb(body, raw=False)
    data["sources"][0]["name"] = b"code"
    with pytest.raises(WireError):
        decode([header, msgpack.packb(data, use_bin_type=True)])


# ---- what a forged meta may cost ----


def _many_segments():
    """64 sources: 63 of weight 1 that drop out one after the other (max_epochs 1, epoch_rows 1, 2, ...),
    and one of weight 2100 that never does: 64 segments, each with a period of over 2,100 rows."""
    return [SourceInfo(f"s{i}", 1.0, f"{i:016x}", 1, i + 1, b"\0" * 8) for i in range(63)] + [
        SourceInfo("big", 2100.0, f"{63:016x}", 0, 1, b"\0" * 8)]


def test_a_mixture_whose_segments_would_take_too_many_steps_is_refused():
    with pytest.raises(MixtureError, match=f"over {MAX_MIXTURE_STEPS} steps"):
        Mixture(_many_segments())  # 4.45 million steps in all; the first segment alone 138,432
    assert MAX_MIXTURE_STEPS == MAX_MIXTURE_PERIOD * MAX_SOURCES  # every one-segment mixture fits


def test_a_meta_whose_mixture_passes_the_steps_is_refused_naming_the_field(monkeypatch):
    data = make_meta(sources={"code": 0.2, "prose": 0.8}).to_dict()
    data["sampling"] = "epoch"
    for epoch_rows, source in zip((3, 7), data["sources"]):
        source.update(max_epochs=1, epoch_rows=epoch_rows)
    data["corpus_fingerprint"] = mixture_fingerprint(tuple(SourceInfo.parse(s, wire=False) for s in data["sources"]))
    assert len(StreamMeta.from_dict(data).mixture.segments) == 2  # 5 x 2 steps, then 1 x 1
    monkeypatch.setattr("shared.mixture.MAX_MIXTURE_STEPS", 10)
    with pytest.raises(MetaError, match=r"meta field sources: .* over 10 steps to compute \(segment 2"):
        StreamMeta.from_dict(data)
