"""DatasetConsumer in-process, fed by producers in the test (docs/PROTOCOL.md §6).

``OrderServer`` (tests/helpers/producers.py) is a well-behaved producer: it announces its stream
with meta messages and answers the consumer's orders with hand-built messages. Hostile or broken
peers are bare DEALER sockets that send what they like.
"""

import dataclasses
import logging
import time

import numpy as np
import pytest
import torch
import zmq

from shared.recording import RecordingReader
from shared.wire import encode
from trainer.data.accounting import ProducerTable
from trainer.data.assembly import BatchAssembler
from trainer.data.batches import source_rows_before
from trainer.data.consumer import DatasetConsumer
from trainer.data.device import WIDE_DTYPES, host_tensor, to_device
from trainer.data.orders import Cursor, OrderSettings

from helpers import wait_until
from helpers.producers import OrderServer, dealer, listed
from helpers.wire import INCARNATION, STAGES, as_bytes, decode_with, make_frames, make_meta, make_tensors, meta_frames


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def batch_frames(meta, producer_id, seq, tensors, split="train", index=0):
    return encode(meta, split, producer_id, seq, tensors, index, incarnation=INCARNATION)


def consumer(batch_size, **kwargs):
    """An unstarted consumer on a free loopback port; ``with`` starts it."""
    return DatasetConsumer("tcp://127.0.0.1:*", batch_size, **kwargs)


def rows_of(batches, name):
    return torch.cat([b[name] for b in batches]).numpy()


@pytest.mark.parametrize("rows_per_message,batch_size", [(4, 3), (3, 8), (5, 5), (7, 2)])
def test_batches_have_exact_size_and_keep_row_order(context, rows_per_message, batch_size):
    meta = make_meta(block_size=32, rows_per_message=rows_per_message, val_messages=0)
    rng = np.random.default_rng(1)
    messages = [make_tensors(meta, rows_per_message, rng) for _ in range(12)]
    with consumer(batch_size) as c, OrderServer(c.endpoint, meta, listed(messages)):
        n_batches = 12 * rows_per_message // batch_size
        batches = [c.next_batch(timeout=5) for _ in range(n_batches)]
        wait_until(lambda: c.stats().to_dict()["producers"]["p0"]["train"] == 12)
        stats = c.stats().to_dict()
    for batch in batches:
        assert batch["x"].shape == (batch_size, meta.block_size)
        assert batch["x"].dtype == batch["y"].dtype == batch["attention_mask"].dtype == torch.int64
        assert batch["mask_ratio"].dtype == torch.float32 and batch["mask_ratio"].shape == (batch_size,)
    for name in ("x", "y", "attention_mask", "mask_ratio"):
        sent = np.concatenate([m[name] for m in messages])[: n_batches * batch_size]
        np.testing.assert_array_equal(rows_of(batches, name), sent.astype(rows_of(batches, name).dtype))
    assert stats["gaps"] == 0 and stats["duplicates"] == 0 and stats["orders_unordered"] == stats["orders_duplicate"] == 0
    assert stats["producers"]["p0"]["meta"] >= 1 and stats["orders_delivered"] == 12


def test_stage_is_widened_and_batch_stats_are_set(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0, corruption=STAGES)
    rng = np.random.default_rng(2)
    tensors = make_tensors(meta, 4, rng, with_stage=True)
    with consumer(4) as c, OrderServer(c.endpoint, meta, listed([tensors])):
        first = c.next_batch(timeout=5)
    assert first["stage"].dtype == torch.int64
    np.testing.assert_array_equal(first["stage"].numpy(), tensors["stage"])
    assert dataclasses.asdict(c.last_batch_stats)["rows"] == 4
    assert dataclasses.asdict(c.last_batch_stats)["valid_len"]["max"] == int(tensors["attention_mask"].sum(1).max())
    assert c.cumulative_mask_ratio.count == 4


def test_a_mixtures_source_is_widened_and_its_rows_are_counted_per_source(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0, sources={"code": 0.2, "prose": 0.8})
    rng = np.random.default_rng(3)
    messages = [make_tensors(meta, 4, rng) for _ in range(3)]
    with consumer(6) as c, OrderServer(c.endpoint, meta, listed(messages)):
        batches = [c.next_batch(timeout=5) for _ in range(2)]
        rows = c.stats().rows_by_source
    sent = np.concatenate([m["source"] for m in messages])
    assert all(batch["source"].dtype == torch.int64 for batch in batches)
    np.testing.assert_array_equal(rows_of(batches, "source"), sent)
    assert rows == {"code": int((sent == 0).sum()), "prose": int((sent == 1).sum())} and sum(rows.values()) == 12
    with consumer(6) as c, OrderServer(c.endpoint, meta, listed(messages)):
        c.seek(Cursor(position=1, rows_used=2))  # a resumed run: the rows before it count from the mixture's assignment
        c.next_batch(timeout=5)
        resumed = c.stats().rows_by_source
    before = source_rows_before(meta, Cursor(1, 2), 0, 1)
    np.testing.assert_array_equal(before, np.bincount(meta.mixture.assign(0, 6)[0], minlength=2))
    taken = np.bincount(sent[6:12], minlength=2)
    assert resumed == {"code": int(before[0] + taken[0]), "prose": int(before[1] + taken[1])}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rows_before_a_resumed_cursor_summed_over_the_ranks_are_the_rows_the_ranks_had_taken(world):
    meta = make_meta(rows_per_message=4, val_messages=0, sources={"a": 0.2, "b": 0.5, "c": 0.3})
    cursor = Cursor(position=5, rows_used=3, world=world)
    taken = [row for rank in range(world) for k in range(rank, 5 * world + rank + 1, world)
             for row in range(k * 4, k * 4 + (4 if k < 5 * world else 3))]
    expected = np.bincount(meta.mixture.assign(0, max(taken) + 1)[0][taken], minlength=3)
    total = sum(source_rows_before(meta, cursor, rank, world) for rank in range(world))
    np.testing.assert_array_equal(total, expected)


def test_producer_table_counts_gaps_duplicates_and_late_arrivals():
    table = ProducerTable()
    for seq in [5, 6, 9, 7, 7, 3, 4, 10]:
        table.record("a", INCARNATION, seq, "train", 0.0)
    row = dataclasses.asdict(table.rows(0.0)["a"])
    # Seen 3..10 except 8: one gap. 7 and 3 and 4 came late (7 filled a gap, 3 extended the start, 4 filled).
    assert row["gaps"] == 1
    assert row["duplicates"] == 1
    assert row["out_of_order"] == 3
    assert row["first_seq"] == 3 and row["last_seq"] == 10 and row["messages"] == 8


def test_gaps_duplicates_and_unordered_messages_on_the_wire(context):
    meta = make_meta(block_size=32, val_messages=0)
    rng = np.random.default_rng(3)
    with consumer(4) as c:
        socket = dealer(context, c.endpoint)
        socket.send_multipart(meta_frames(meta, "p", 0))
        for seq in [1, 2, 5, 5, 6]:  # valid batches nobody ordered
            socket.send_multipart(make_frames(meta, "p", seq, rng, index=seq))
        wait_until(lambda: c.stats().to_dict()["received"] == 6)
        with pytest.raises(TimeoutError):
            c.next_batch(timeout=0.3)
        stats = c.stats().to_dict()
    assert stats["gaps"] == 2 and stats["duplicates"] == 1  # the sequence accounting sees every valid message
    assert stats["orders_unordered"] == 5 and stats["rejected"] == {}
    assert stats["consumed_messages"] == 0


def test_bad_messages_are_rejected_by_reason_and_the_good_stream_is_unaffected(context, caplog):
    meta = make_meta(block_size=32, val_messages=0)
    other = make_meta(val_messages=0, block_size=meta.block_size * 2)
    stranger = make_meta(val_messages=0, block_size=meta.block_size * 3)  # its meta message never comes
    rng = np.random.default_rng(4)
    good = [make_tensors(meta, meta.rows_per_message, rng) for _ in range(7)]
    truncated = as_bytes(make_frames(meta, "bad", 0, rng))
    truncated[1] = truncated[1][:-2]
    no_ratio = make_tensors(meta, 4, rng)
    del no_ratio["mask_ratio"]
    with_stage = {**make_tensors(meta, 4, rng), "stage": np.zeros(4, np.uint8)}
    bad = [
        [b"garbage"],
        [b"\xff\xfe not msgpack", b"1", b"2", b"3", b"4"],
        truncated,
        meta_frames(other, "other"),
        make_frames(other, "other", 1, rng),
        make_frames(stranger, "stranger", 1, rng),
        batch_frames(meta, "bad", 1, no_ratio),
        batch_frames(meta, "bad", 2, with_stage),
    ]
    caplog.set_level(logging.WARNING, logger="trainer.data.consumer")
    with consumer(4) as c, OrderServer(c.endpoint, meta, listed(good), producer_id="good"):
        c.wait_for_meta(5)
        socket = dealer(context, c.endpoint)
        for bad_frames in bad:
            socket.send_multipart(bad_frames)
        batches = [c.next_batch(timeout=5) for _ in range(7)]
        wait_until(lambda: c.stats().to_dict()["rejected_total"] + c.stats().to_dict()["awaiting_meta"] == 8)
        stats = c.stats().to_dict()
    # A foreign meta message and its batch are named mismatches; a batch with no meta message is held back.
    assert stats["rejected"] == {"frame_count": 1, "header_not_msgpack": 1, "size": 1, "meta_mismatch": 2, "tensor_list": 2}
    assert stats["awaiting_meta"] == 1
    assert stats["gaps"] == 0 and stats["orders_delivered"] == 7
    assert list(stats["producers"]) == ["good"]
    assert c.meta == meta
    np.testing.assert_array_equal(rows_of(batches, "x"), np.concatenate([t["x"] for t in good]))
    mismatch = [r.message for r in caplog.records if "meta_mismatch" in r.message]
    assert mismatch and f"block_size is {other.block_size}" in mismatch[0] and f"has {meta.block_size}" in mismatch[0]


def test_the_val_set_is_ordered_first_and_batched_in_val_index_order(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=3)
    rng = np.random.default_rng(5)
    val = [make_tensors(meta, 4, rng) for _ in range(3)]
    impostor = make_tensors(meta, 4, rng)
    with consumer(5) as c:
        stalled = OrderServer(c.endpoint, meta, listed([], val), producer_id="a")
        stalled.paused.set()
        with stalled:
            wait_until(lambda: len(stalled.orders) >= 3)
            assert not c.wait_for_val_set(timeout=0.3)
            with pytest.raises(RuntimeError, match="incomplete"):
                c.val_batches()
            assert {order.split for order in stalled.orders} == {"val"}  # no train order before seek/next_batch
            socket = dealer(context, c.endpoint)
            socket.send_multipart(meta_frames(meta, "b", 0))
            socket.send_multipart(batch_frames(meta, "b", 1, impostor, "val", 2))  # never ordered from b: dropped
            wait_until(lambda: c.stats().to_dict()["orders_unordered"] == 1)
            stalled.paused.clear()
            assert c.wait_for_val_set(timeout=5)
        batches = c.val_batches()
        stats = c.stats().to_dict()
    assert [len(b["x"]) for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(rows_of(batches, "x"), np.concatenate([v["x"] for v in val]))
    assert stats["val_messages_seen"] == 3 and stats["val_messages_total"] == 3


def test_orders_stop_while_the_queue_is_full_and_the_credit_bounds_each_producer(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    messages = [make_tensors(meta, 4, np.random.default_rng(k)) for k in range(200)]
    settings = OrderSettings(credit=3, ahead=6)
    with consumer(4, queue_batches=2, orders=settings) as c, OrderServer(c.endpoint, meta, listed(messages)) as producer:
        first = c.next_batch(timeout=5)  # starts the schedule
        time.sleep(1.0)
        stats = c.stats().to_dict()
        # What was ordered: the batch taken, the full queue, and at most `ahead` beyond the head.
        assert producer.sent <= 1 + 2 + settings.ahead + 1
        assert stats["orders_outstanding"] <= settings.credit and stats["queue_depth"] == 2
        rest = [c.next_batch(timeout=5) for _ in range(20)]
    np.testing.assert_array_equal(rows_of([first, *rest], "x"), np.concatenate([m["x"] for m in messages[:21]]))


def test_starved_after_silence_and_recovers(context, caplog):
    meta = make_meta(block_size=32, val_messages=0)
    rng = np.random.default_rng(7)
    caplog.set_level(logging.INFO, logger="trainer.data.consumer")
    with consumer(4, starved_after_s=0.3) as c:
        wait_until(lambda: c.stats().to_dict()["starved"])
        assert any("waiting for producers" in r.message for r in caplog.records)
        with pytest.raises(TimeoutError, match="no train batch within 0.2 s"):
            c.next_batch(timeout=0.2)
        with OrderServer(c.endpoint, meta, listed([make_tensors(meta, 4, rng)])):
            c.next_batch(timeout=5)
        assert not c.stats().to_dict()["starved"]
        assert any("producers are back" in r.message for r in caplog.records)


def test_recording_holds_handed_out_messages_in_consumption_order(tmp_path, context):
    meta = make_meta(block_size=32, rows_per_message=3, val_messages=2)
    rng = np.random.default_rng(9)
    path = tmp_path / "rec.lpr"
    train = [make_tensors(meta, 3, rng) for _ in range(10)]
    val = [make_tensors(meta, 3, rng) for _ in range(2)]
    with consumer(4, record_path=str(path)) as c, OrderServer(c.endpoint, meta, listed(train, val), producer_id="p"):
        assert c.wait_for_val_set(timeout=5)
        batches = [c.next_batch(timeout=5) for _ in range(4)]  # 16 rows: messages 0..5 start in them
    with RecordingReader(path) as reader:
        records = list(reader)
    assert decode_with(meta, records[0]).meta == meta, "the meta message first: a replay pins the same stream"
    recorded = [(decode_with(meta, r).split, decode_with(meta, r).index) for r in records[1:]]
    assert sorted(recorded[:2]) == [("val", 0), ("val", 1)]
    assert recorded[2:] == [("train", k) for k in range(6)]

    replayed_messages = {(m.split, m.index): dict(m.tensors) for m in (decode_with(meta, r) for r in records[1:])}
    replay = lambda split, index: replayed_messages.get((split, index))  # noqa: E731
    with consumer(4) as replayed, OrderServer(replayed.endpoint, meta, replay):
        assert replayed.wait_for_val_set(timeout=5)
        again = [replayed.next_batch(timeout=5) for _ in range(4)]
    for a, b in zip(batches, again):
        for name in a:
            assert torch.equal(a[name], b[name])


def test_assembler_tags_the_batch_holding_each_first_row():
    meta = make_meta(block_size=32, rows_per_message=5, val_messages=0)
    rng = np.random.default_rng(10)
    first = make_tensors(meta, 5, rng)
    assembler = BatchAssembler(3, first)
    done = assembler.add(first, "m0") + assembler.add(make_tensors(meta, 5, rng), "m1")
    # Rows: batch 0 = m0[0:3], batch 1 = m0[3:5] + m1[0:1], batch 2 = m1[1:4]; m1[4] waits.
    assert [tags for _, tags in done] == [["m0"], ["m1"], []]


def test_closed_consumer_refuses_batches_and_a_taken_port_is_an_error():
    with consumer(4) as c:
        endpoint = c.endpoint
        with pytest.raises(zmq.ZMQError):
            DatasetConsumer(endpoint, 4).start()
    with pytest.raises(RuntimeError, match="closed"):
        c.next_batch(timeout=1)
    with DatasetConsumer(endpoint, 4) as again:  # the port is free again after close()
        assert again.endpoint == endpoint


def test_an_aligned_message_becomes_its_batch_without_a_copy_and_others_are_copied():
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    rng = np.random.default_rng(11)
    aligned = make_tensors(meta, 4, rng)
    assembler = BatchAssembler(4, aligned)
    [(batch, tags)] = assembler.add(aligned, "m0")
    assert tags == ["m0"] and all(np.shares_memory(batch[name], aligned[name]) for name in aligned)
    small = make_tensors(meta, 2, rng)
    assert assembler.add(small, "m1") == []
    [(batch, tags)] = assembler.add(aligned, "m2")  # rows 0..1 of m2 complete the batch: a copy
    assert tags == ["m1", "m2"] and not any(np.shares_memory(batch[name], aligned[name]) for name in aligned)
    np.testing.assert_array_equal(batch["x"], np.concatenate([small["x"], aligned["x"][:2]]))


def test_handed_out_tensors_are_writable_copies_not_views_of_the_frames(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0, corruption=STAGES)
    tensors = make_tensors(meta, 4, np.random.default_rng(12), with_stage=True)
    received = decode_with(meta, [bytes(frame) for frame in batch_frames(meta, "p", 1, tensors)]).tensors  # read-only views
    cpu = torch.device("cpu")
    host = {name: host_tensor(cpu, array, meta.vocab_size) for name, array in received.items()}
    batch = to_device(cpu, host)
    for name, array in received.items():
        assert not array.flags.writeable
        assert batch[name].dtype == WIDE_DTYPES[name] and batch[name].numpy().flags.writeable, name
        assert not np.shares_memory(batch[name].numpy(), array), name
        np.testing.assert_array_equal(batch[name].numpy(), array)
    with consumer(4) as live, OrderServer(live.endpoint, meta, listed([tensors])):  # and through the socket, end to end
        first = live.next_batch(timeout=5)
    first["mask_ratio"].zero_()  # float32 stays float32: this is where a view would show
    assert int(first["x"].sum()) == int(tensors["x"].sum())


@pytest.mark.parametrize("every_s,batches_with_stats", [(0.0, "all"), (3600.0, "first")])
def test_batch_statistics_are_computed_per_interval_and_the_histogram_sees_every_row(context, monkeypatch, every_s, batches_with_stats):
    monkeypatch.setattr("trainer.data.batches.STATS_EVERY_S", every_s)
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    rng = np.random.default_rng(13)
    messages = [make_tensors(meta, 4, rng) for _ in range(6)]
    seen = []
    with consumer(4) as c, OrderServer(c.endpoint, meta, listed(messages)):
        for _ in messages:
            c.next_batch(timeout=5)
            seen.append(dataclasses.asdict(c.last_batch_stats))
    source = messages if batches_with_stats == "all" else [messages[0]] * len(messages)
    for stats, tensors in zip(seen, source):
        assert stats["valid_len"]["mean"] == pytest.approx(tensors["attention_mask"].sum(1).mean())
        assert stats["mask_ratio"]["p50"] == pytest.approx(float(np.percentile(tensors["mask_ratio"], 50)))
    assert c.cumulative_mask_ratio.count == 6 * 4


def test_a_peer_sending_an_oversized_frame_is_cut_off_unread_and_others_go_on(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    rng = np.random.default_rng(14)
    tensors = make_tensors(meta, 4, rng)
    with consumer(4, max_frame_bytes=1 << 20) as c:
        hostile = dealer(context, c.endpoint)
        hostile.send_multipart([b"\x80", bytes(4 << 20)])  # a 4 MiB frame against a 1 MiB limit
        with OrderServer(c.endpoint, meta, listed([tensors]), producer_id="good"):
            first = c.next_batch(timeout=5)
        stats = c.stats().to_dict()
    np.testing.assert_array_equal(first["x"].numpy(), tensors["x"])
    assert stats["rejected_total"] == 0 and set(stats["producers"]) == {"good"}


def test_per_producer_accounting_counts_consumed_and_rejected_messages(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    other = make_meta(rows_per_message=4, val_messages=0, block_size=meta.block_size * 2)
    rng = np.random.default_rng(15)
    good = [make_tensors(meta, 4, rng) for _ in range(3)]
    with consumer(4) as c, OrderServer(c.endpoint, meta, listed(good), producer_id="good"):
        c.wait_for_meta(5)
        socket = dealer(context, c.endpoint)
        socket.send_multipart(meta_frames(other, "foreign"))
        for seq in range(1, 3):
            socket.send_multipart(batch_frames(other, "foreign", seq, make_tensors(other, 4, rng)))
        socket.send_multipart([b"garbage"])
        bad = make_tensors(meta, 4, rng)
        bad["x"] = bad["x"].copy()
        bad["x"][0, 0] = meta.vocab_size  # an id outside the vocabulary
        socket.send_multipart(batch_frames(meta, "good", 4, bad))
        batches = [c.next_batch(timeout=5) for _ in range(2)]
        wait_until(lambda: c.stats().to_dict()["rejected_total"] == 5
                   and c.stats().to_dict()["producers"]["good"]["train"] == 3)  # the third may still be on its way
        stats = c.stats().to_dict()
    assert len(batches) == 2
    assert stats["producers"]["good"]["consumed"] == 2 and stats["producers"]["good"]["train"] == 3
    assert "foreign" not in stats["producers"]
    assert stats["rejected_by_producer"] == {"foreign": {"meta_mismatch": 3}, "good": {"value_range": 1}}
    assert stats["rejected"] == {"meta_mismatch": 3, "frame_count": 1, "value_range": 1}  # the garbage names no producer


def generated(meta):
    """Train message k for any k (a producer never runs out)."""
    return lambda split, k: make_tensors(meta, meta.rows_per_message, np.random.default_rng(k)) if split == "train" else None


def test_an_order_not_delivered_in_time_goes_to_another_producer_and_the_late_copy_is_a_duplicate(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    messages = [make_tensors(meta, 4, np.random.default_rng(k)) for k in range(20)]
    settings = OrderSettings(credit=2, reassign_s=0.3)
    with consumer(4, orders=settings) as c:
        slow = OrderServer(c.endpoint, meta, generated(meta), producer_id="slow")
        slow.paused.set()  # takes orders, delivers nothing
        with slow, OrderServer(c.endpoint, meta, generated(meta), producer_id="fast"):
            wait_until(lambda: c.stats().to_dict()["producers"].keys() >= {"slow", "fast"})
            batches = [c.next_batch(timeout=10) for _ in range(20)]
            slow.paused.clear()  # its late copies arrive now
            wait_until(lambda: c.stats().to_dict()["orders_duplicate"] >= 1)
            stats = c.stats().to_dict()
    np.testing.assert_array_equal(rows_of(batches, "x"), np.concatenate([m["x"] for m in messages[:20]]))
    assert stats["orders_reassigned"] >= 1 and stats["producers"]["slow"]["orders_reassigned"] >= 1


def test_a_silent_producer_is_forgotten_and_its_orders_go_to_others(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    messages = [make_tensors(meta, 4, np.random.default_rng(k)) for k in range(20)]
    with consumer(4, orders=OrderSettings(silence_s=0.5, reassign_s=60)) as c:
        # It answers k = 0, 1 only, so whatever else it was ordered is still outstanding when it dies
        # (answering everything, a fast one could leave nothing to reassign).
        dying = OrderServer(c.endpoint, meta, lambda split, k: generated(meta)(split, k) if k < 2 else None, producer_id="dying")
        with dying:
            first = [c.next_batch(timeout=5) for _ in range(2)]
            dying.paused.set()
            time.sleep(0.1)
        with OrderServer(c.endpoint, meta, generated(meta), producer_id="new"):  # a restart: another connection
            rest = [c.next_batch(timeout=10) for _ in range(18)]
            stats = c.stats().to_dict()
    np.testing.assert_array_equal(rows_of(first + rest, "x"), np.concatenate([m["x"] for m in messages[:20]]))
    assert stats["orders_reassigned"] >= 1


def test_seek_starts_the_schedule_at_a_cursor_and_the_cursor_follows_the_batches(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    messages = [make_tensors(meta, 4, np.random.default_rng(k)) for k in range(12)]
    with consumer(3) as c, OrderServer(c.endpoint, meta, listed(messages)):
        c.seek(Cursor(position=2, rows_used=1))
        batches = [c.next_batch(timeout=5) for _ in range(5)]
        cursor = c.cursor
        with pytest.raises(RuntimeError, match="once"):
            c.seek(Cursor())
    rows = np.concatenate([m["x"] for m in messages])[2 * 4 + 1 :]
    np.testing.assert_array_equal(rows_of(batches, "x"), rows[:15])
    assert cursor == Cursor(position=6, rows_used=0)  # 9 + 15 = 24 rows = 6 messages


def test_a_rank_trains_on_its_own_share_of_the_schedule(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    messages = [make_tensors(meta, 4, np.random.default_rng(k)) for k in range(20)]
    with consumer(4, rank=1, world=3) as c, OrderServer(c.endpoint, meta, listed(messages)) as producer:
        batches = [c.next_batch(timeout=5) for _ in range(5)]
        orders = {order.start for order in producer.orders if order.split == "train"}
    np.testing.assert_array_equal(rows_of(batches, "x"), np.concatenate([messages[k]["x"] for k in (1, 4, 7, 10, 13)]))
    assert all(k % 3 == 1 for k in orders)


@pytest.mark.parametrize("old,new", [(Cursor(5, 0, 2), (4, 3)), (Cursor(5, 2, 2), (4, 4))])
def test_a_cursor_of_another_world_size_starts_where_no_old_rank_had_begun(old, new):
    # Old world 2 at position 5: k 0..9 done (10..11 begun when rows_used > 0). New world 3.
    first_free = 10 if old.rows_used == 0 else 12
    for rank in range(3):
        mapped = old.for_world(3, rank)
        assert mapped.rows_used == 0 and rank + 3 * mapped.position >= first_free
        assert rank + 3 * (mapped.position - 1) < first_free
    assert old.for_world(2, 0) == old
    assert (old.for_world(3, 0).position, old.for_world(3, 1).position) == new


def test_a_meta_of_another_stream_is_refused_and_the_producer_told(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    other = make_meta(rows_per_message=4, val_messages=0, block_size=64)
    with consumer(4) as c, OrderServer(c.endpoint, meta, listed([make_tensors(meta, 4, np.random.default_rng(0))])):
        c.next_batch(timeout=5)
        socket = dealer(context, c.endpoint)
        socket.send_multipart(meta_frames(other, "foreign"))
        assert socket.poll(5000)
        from shared.wire import Refusal, decode_control
        refusal = decode_control(socket.recv_multipart())
    assert isinstance(refusal, Refusal) and refusal.reason == "meta_mismatch" and "block_size" in refusal.detail


def test_peers_beyond_the_limit_get_no_orders(context, monkeypatch):
    monkeypatch.setattr("trainer.data.orders.MAX_PEERS", 2)
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    with consumer(4) as c:
        sockets = [dealer(context, c.endpoint) for _ in range(4)]
        for i, socket in enumerate(sockets):
            socket.send_multipart(meta_frames(meta, f"p{i}"))
        c.seek(Cursor())
        wait_until(lambda: sum(bool(socket.poll(0)) for socket in sockets) == 2)
        time.sleep(0.2)
        assert sum(bool(socket.poll(0)) for socket in sockets) == 2


def test_the_only_producer_is_ordered_again_what_it_did_not_deliver(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    lost = {0, 1}  # it "loses" its first orders for k 0 and 1 (e.g. they were dropped on the way)

    def forgetful(split, k):
        if k in lost:
            lost.discard(k)
            return None
        return make_tensors(meta, 4, np.random.default_rng(k))

    with consumer(4, orders=OrderSettings(reassign_s=0.3)) as c, OrderServer(c.endpoint, meta, forgetful) as producer:
        batches = [c.next_batch(timeout=5) for _ in range(4)]
        stats = c.stats().to_dict()
    np.testing.assert_array_equal(rows_of(batches, "x"), np.concatenate([make_tensors(meta, 4, np.random.default_rng(k))["x"]
                                                                         for k in range(4)]))
    assert stats["orders_reassigned"] >= 2 and [o.start for o in producer.orders].count(0) == 2


def test_a_peer_that_takes_orders_but_never_reads_or_delivers_stalls_nothing_beyond_the_timeout(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    with consumer(4, orders=OrderSettings(reassign_s=0.3, credit=2)) as c:
        deaf = dealer(context, c.endpoint)
        deaf.setsockopt(zmq.RCVHWM, 1)
        deaf.send_multipart(meta_frames(meta, "deaf"))  # known, ordered from, never reads a thing
        c.seek(Cursor())
        wait_until(lambda: c.stats().to_dict()["orders_outstanding"] >= 2)
        with OrderServer(c.endpoint, meta, generated(meta), producer_id="good"):
            batches = [c.next_batch(timeout=10) for _ in range(10)]
            stats = c.stats().to_dict()
    np.testing.assert_array_equal(rows_of(batches, "x"),
                                  np.concatenate([make_tensors(meta, 4, np.random.default_rng(k))["x"] for k in range(10)]))
    assert stats["orders_reassigned"] >= 2


def test_a_known_producers_rejected_messages_still_count_in_its_sequence(context):
    """Issue 26 item 5: rejected messages must advance their producer's accounting, else they
    show as gaps (received + gaps = sent); a forger's id gets no row."""
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    rng = np.random.default_rng(20)
    with consumer(4) as c:
        socket = dealer(context, c.endpoint)
        socket.send_multipart(meta_frames(meta, "p", 0))  # accepted: p is known
        bad = make_tensors(meta, 4, rng)
        bad["x"] = bad["x"].copy()
        bad["x"][0, 0] = meta.vocab_size
        for seq in (1, 2, 3):
            socket.send_multipart(batch_frames(meta, "p", seq, bad))  # value_range rejects of a known producer
        socket.send_multipart(batch_frames(meta, "forger", 1, bad))  # and of an id never accepted
        socket.send_multipart(meta_frames(meta, "p", 4))
        wait_until(lambda: c.stats().to_dict()["received"] == 6)
        stats = c.stats().to_dict()
    row = stats["producers"]["p"]
    assert row["gaps"] == 0 and row["rejected"] == 3 and row["messages"] == 5 and row["last_seq"] == 4
    assert set(stats["producers"]) == {"p"} and stats["rejected"] == {"value_range": 4}
