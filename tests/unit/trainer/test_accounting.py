"""Per-producer accounting under hostile sequence numbers and ids (issue 20 items 2, 3, 4, 9):
bounded memory whatever arrives, forged jumps counted apart, restarts recognized, capped tables."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.accounting import MAX_MISSING_RANGES, MAX_TRACKED_PRODUCERS, OTHER, SEQ_WINDOW, ProducerTable, StreamLedger

A, B = "a" * 16, "b" * 16  # two incarnations


def row(table: ProducerTable, producer_id: str = "p") -> dict:
    return dataclasses.asdict(table.rows(0.0)[producer_id])


def test_forged_far_jumps_cost_almost_nothing():
    """100 fresh ids, each seq 0 then seq 2^62 (the attack that grew the trainer by 503 MiB)."""
    table = ProducerTable()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for index in range(100):
        table.record(f"forger-{index}", A, 0, "train", 0.0)
        table.record(f"forger-{index}", A, 1 << 62, "train", 0.0)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 512 << 10, f"{grown} bytes for 200 messages"
    assert all(r.gaps == 0 and r.seq_anomalies == 1 for r in table.rows(0.0).values())


def test_one_forged_jump_leaves_a_real_producer_untouched():
    table = ProducerTable()
    for seq in range(10):
        table.record("p", A, seq, "train", 0.0)
    table.record("p", A, 1 << 62, "train", 0.0)  # forged under the live producer's id and incarnation
    for seq in range(10, 30):
        table.record("p", A, seq, "train", 0.0)
    result = row(table)
    assert result["gaps"] == 0 and result["duplicates"] == 0 and result["out_of_order"] == 0
    assert result["seq_anomalies"] == 1 and result["last_seq"] == 29 and result["messages"] == 31


def test_gaps_within_the_window_are_real_gaps_and_late_arrivals_fill_them():
    table = ProducerTable()
    for seq in (0, 1, 5, SEQ_WINDOW, 3):
        table.record("p", A, seq, "train", 0.0)
    result = row(table)
    assert result["gaps"] == SEQ_WINDOW - 3 - 1 and result["out_of_order"] == 1 and result["seq_anomalies"] == 0


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=400))
@settings(max_examples=200, deadline=None)
def test_the_missing_ranges_stay_bounded_and_exact_while_they_fit(seqs):
    table = ProducerTable()
    for seq in seqs:
        table.record("p", A, seq, "train", 0.0)
    state = table._states["p"]
    assert len(state.missing) <= MAX_MISSING_RANGES
    seen = set(seqs)
    start = seqs[0]
    window = range(min(seen | {start}), max(seen) + 1)
    if state.forgotten_below < 0:  # nothing dropped by the cap: the ranges are exactly what never came
        missing = {seq for low, high in state.missing for seq in range(low, high)}
        assert missing == {seq for seq in window if seq not in seen}
        assert row(table)["gaps"] == len(missing)
    assert row(table)["duplicates"] == len(seqs) - len(seen)


def test_a_restart_with_the_same_id_is_a_new_sequence_not_phantom_gaps():
    """A resumed trainer first sees P2 at seq 357; P2 restarts (same id, new incarnation) and sends 30."""
    table = ProducerTable()
    for seq in range(357, 360):
        table.record("p2", A, seq, "train", 0.0)
    for seq in range(30):
        table.record("p2", B, seq, "train", 0.0)
    result = row(table, "p2")
    assert result["restarts"] == 1 and result["incarnation"] == B
    assert result["gaps"] == 0 and result["out_of_order"] == 0 and result["duplicates"] == 0
    assert result["messages"] == 33 and (result["first_seq"], result["last_seq"]) == (0, 29)


def test_tables_are_capped_with_an_other_row():
    table = ProducerTable()
    for index in range(MAX_TRACKED_PRODUCERS + 500):
        table.record(f"p{index}", A, 0, "train", 0.0)
    rows = table.rows(0.0)
    assert len(rows) == MAX_TRACKED_PRODUCERS + 1 and rows[OTHER].messages == 500


def test_twenty_thousand_rejected_ids_keep_the_diagnostics_small():
    """The attack that made /diagnostics 3.1 MB: 20,000 rejected messages with distinct ids."""
    ledger = StreamLedger()
    for index in range(20_000):
        ledger.rejections.count("size", f"attacker-{index:05d}-{'x' * 40}")
    stats = ledger.stats(0.0, 0, 0, None)
    assert len(stats.rejected_by_producer) == MAX_TRACKED_PRODUCERS + 1
    assert stats.rejected_by_producer[OTHER] == {"size": 20_000 - MAX_TRACKED_PRODUCERS}
    assert len(json.dumps(stats.to_dict())) < 200_000


def test_rejection_counts_per_producer_drive_the_log_rate():
    """The consumer logs the 1st, 2nd, 4th... reject of each reason from each producer: each offender is named."""
    ledger = StreamLedger()
    counts = [ledger.rejections.count("meta_mismatch", producer) for producer in ("x", "x", "y", "x", None, None)]
    assert counts == [1, 2, 1, 3, 1, 2]
