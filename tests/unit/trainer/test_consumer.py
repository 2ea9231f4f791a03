"""DatasetConsumer in-process, fed by a PUSH socket in the test with hand-built messages.

As a real producer does, each test producer sends its meta message first (seq 0) and its
batches after it (seq 1, 2, ...), all under one incarnation."""

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
from trainer.data.consumer import DatasetConsumer
from trainer.data.device import WIDE_DTYPES, host_tensor, to_device

from helpers import wait_until
from helpers.wire import INCARNATION, STAGES, as_bytes, decode_with, make_frames, make_meta, make_tensors, meta_frames


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def pusher(context, endpoint):
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(endpoint)
    return socket


def announce(socket, meta, *producer_ids):
    """Each producer's meta message (seq 0), as a producer sends it on connecting."""
    for producer_id in producer_ids:
        socket.send_multipart(meta_frames(meta, producer_id, 0))


def batch_frames(meta, producer_id, seq, tensors, split="train", val_index=-1):
    return encode(meta, split, producer_id, seq, tensors, val_index=val_index, incarnation=INCARNATION)


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
    with consumer(batch_size) as c:
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "p0")
        for seq, tensors in enumerate(messages, start=1):
            socket.send_multipart(batch_frames(meta, "p0", seq, tensors), copy=False)
        n_batches = 12 * rows_per_message // batch_size
        batches = [c.next_batch(timeout=5) for _ in range(n_batches)]
        wait_until(lambda: c.stats().to_dict()["accepted"] == 13)
        stats = c.stats().to_dict()
    for batch in batches:
        assert batch["x"].shape == (batch_size, meta.block_size)
        assert batch["x"].dtype == batch["y"].dtype == batch["attention_mask"].dtype == torch.int64
        assert batch["mask_ratio"].dtype == torch.float32 and batch["mask_ratio"].shape == (batch_size,)
    for name in ("x", "y", "attention_mask", "mask_ratio"):
        sent = np.concatenate([m[name] for m in messages])[: n_batches * batch_size]
        np.testing.assert_array_equal(rows_of(batches, name), sent.astype(rows_of(batches, name).dtype))
    assert stats["accepted"] == 13 and stats["gaps"] == 0 and stats["duplicates"] == 0
    assert stats["producers"]["p0"]["last_seq"] == 12 and stats["producers"]["p0"]["meta"] == 1


def test_stage_is_widened_and_batch_stats_are_set(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0, corruption=STAGES)
    rng = np.random.default_rng(2)
    with consumer(4) as c:
        socket = pusher(context, c.endpoint)
        tensors = make_tensors(meta, 4, rng, with_stage=True)
        announce(socket, meta, "p")
        socket.send_multipart(batch_frames(meta, "p", 1, tensors))
        first = c.next_batch(timeout=5)
    assert first["stage"].dtype == torch.int64
    np.testing.assert_array_equal(first["stage"].numpy(), tensors["stage"])
    assert dataclasses.asdict(c.last_batch_stats)["rows"] == 4
    assert dataclasses.asdict(c.last_batch_stats)["valid_len"]["max"] == int(tensors["attention_mask"].sum(1).max())
    assert c.cumulative_mask_ratio.count == 4


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


def test_gaps_and_duplicates_on_the_wire(context):
    meta = make_meta(block_size=32, val_messages=0)
    rng = np.random.default_rng(3)
    with consumer(4) as c:
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "p")
        for seq in [1, 2, 5, 5, 6]:
            socket.send_multipart(make_frames(meta, "p", seq, rng))
        for _ in range(5):
            c.next_batch(timeout=5)
        stats = c.stats().to_dict()
    assert stats["gaps"] == 2 and stats["duplicates"] == 1
    assert stats["consumed_messages"] == 5 and stats["consumed_batches"] == 5


def test_bad_messages_are_rejected_by_reason_and_the_good_stream_is_unaffected(context, caplog):
    meta = make_meta(block_size=32, val_messages=0)
    other = make_meta(val_messages=0, block_size=meta.block_size * 2)
    stranger = make_meta(val_messages=0, block_size=meta.block_size * 3)  # its meta message never comes
    rng = np.random.default_rng(4)
    good = [meta_frames(meta, "good")] + [make_frames(meta, "good", seq, rng) for seq in range(1, 8)]
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
    with consumer(4) as c:
        socket = pusher(context, c.endpoint)
        for good_frames, bad_frames in zip(good, bad + [None]):
            socket.send_multipart(good_frames)
            if bad_frames is not None:
                socket.send_multipart(bad_frames)
        batches = [c.next_batch(timeout=5) for _ in range(7)]
        wait_until(lambda: c.stats().to_dict()["received"] == 16)
        stats = c.stats().to_dict()
    # A foreign meta message and its batch are named mismatches; a batch with no meta message is held back.
    assert stats["rejected"] == {"frame_count": 1, "header_not_msgpack": 1, "size": 1, "meta_mismatch": 2, "tensor_list": 2}
    assert stats["awaiting_meta"] == 1
    assert stats["accepted"] == 8 and stats["gaps"] == 0
    assert list(stats["producers"]) == ["good"]
    assert c.meta == meta
    sent_x = np.concatenate([decode_with(meta, as_bytes(f)).tensors["x"] for f in good[1:]])
    np.testing.assert_array_equal(rows_of(batches, "x"), sent_x)
    mismatch = [r.message for r in caplog.records if "meta_mismatch" in r.message]
    assert mismatch and f"block_size is {other.block_size}" in mismatch[0] and f"has {meta.block_size}" in mismatch[0]


def test_val_set_first_copy_wins_and_batches_are_in_val_index_order(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=3)
    rng = np.random.default_rng(5)
    val = [make_tensors(meta, 4, rng) for _ in range(3)]
    impostor = make_tensors(meta, 4, rng)
    with consumer(5) as c:
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "a", "b")
        socket.send_multipart(batch_frames(meta, "a", 1, val[2], "val", 2))
        socket.send_multipart(batch_frames(meta, "a", 2, val[0], "val", 0))
        socket.send_multipart(batch_frames(meta, "b", 1, impostor, "val", 2))
        assert not c.wait_for_val_set(timeout=0.3)
        with pytest.raises(RuntimeError, match="incomplete"):
            c.val_batches()
        socket.send_multipart(batch_frames(meta, "b", 2, val[1], "val", 1))
        assert c.wait_for_val_set(timeout=5)
        batches = c.val_batches()
        stats = c.stats().to_dict()
    assert [len(b["x"]) for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(rows_of(batches, "x"), np.concatenate([v["x"] for v in val]))
    assert stats["val_messages_seen"] == 3 and stats["val_messages_total"] == 3


def test_waiting_for_the_val_set_reads_past_a_full_queue(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=1)
    rng = np.random.default_rng(6)
    with consumer(4, queue_batches=2) as c:
        socket = pusher(context, c.endpoint)
        socket.setsockopt(zmq.SNDTIMEO, 5000)
        announce(socket, meta, "p")
        seq = 0
        for seq in range(1, 41):  # far more than the queue, the socket buffers and the HWM hold
            socket.send_multipart(make_frames(meta, "p", seq, rng))
        socket.send_multipart(make_frames(meta, "p", seq + 1, rng, split="val", val_index=0))
        assert c.wait_for_val_set(timeout=10)
        stats = c.stats().to_dict()
        assert stats["dropped_train"] > 0
        assert stats["gaps"] == 0  # dropped by the consumer, not lost on the way
        first = c.next_batch(timeout=5)
    assert first["x"].shape == (4, meta.block_size)


def test_starved_after_silence_and_recovers(context, caplog):
    meta = make_meta(block_size=32, val_messages=0)
    rng = np.random.default_rng(7)
    caplog.set_level(logging.INFO, logger="trainer.data.consumer")
    with consumer(4, starved_after_s=0.3) as c:
        wait_until(lambda: c.stats().to_dict()["starved"])
        assert any("waiting for producers" in r.message for r in caplog.records)
        with pytest.raises(TimeoutError, match="no train batch within 0.2 s"):
            c.next_batch(timeout=0.2)
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "p")
        socket.send_multipart(make_frames(meta, "p", 1, rng))
        c.next_batch(timeout=5)
        assert not c.stats().to_dict()["starved"]
        assert any("producers are back" in r.message for r in caplog.records)


def test_full_queue_stops_reading_so_the_sender_blocks(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    rng = np.random.default_rng(8)
    frames = make_frames(meta, "p", 1, rng)
    with consumer(4, queue_batches=2) as c:
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "p")
        sent = 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.send_multipart(frames, flags=zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.05)
                try:
                    socket.send_multipart(frames, flags=zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    break
        assert time.monotonic() < deadline, "the sender never blocked"
        received = c.stats().to_dict()["received"]
        in_flight_bytes = (sent - received) * sum(len(f) for f in as_bytes(frames))
        # Bounded by the high-water marks plus the kernel's TCP buffers (a few MB on loopback).
        assert received < sent and in_flight_bytes < 32 << 20
        assert c.stats().to_dict()["queue_depth"] == 2


def test_recording_holds_handed_out_messages_in_consumption_order(tmp_path, context):
    meta = make_meta(block_size=32, rows_per_message=3, val_messages=2)
    rng = np.random.default_rng(9)
    path = tmp_path / "rec.lpr"
    train = [make_frames(meta, "p", seq, rng) for seq in range(1, 11)]
    val = [make_frames(meta, "p", 11 + i, rng, split="val", val_index=i) for i in range(2)]
    with consumer(4, record_path=str(path)) as c:
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "p")
        socket.send_multipart(val[1])
        for frames in train:
            socket.send_multipart(frames)
        socket.send_multipart(val[0])
        assert c.wait_for_val_set(timeout=5)
        batches = [c.next_batch(timeout=5) for _ in range(4)]  # 16 rows: messages 0..5 start in them
    with RecordingReader(path) as reader:
        records = list(reader)
    assert records[0] == as_bytes(meta_frames(meta, "p")), "the meta message first: a replay pins the same stream"
    recorded = [(decode_with(meta, r).split, decode_with(meta, r).seq) for r in records[1:]]
    assert recorded == [("val", 12), ("val", 11)] + [("train", s) for s in range(1, 7)]
    assert records[3] == as_bytes(train[0])

    with consumer(4) as replayed:
        socket = pusher(context, replayed.endpoint)
        for record in records:
            socket.send_multipart(record)
        assert replayed.wait_for_val_set(timeout=5)
        again = [replayed.next_batch(timeout=5) for _ in range(4)]
        assert replayed.stats().to_dict()["duplicates"] == 0
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
    with consumer(4) as live:  # and through the socket, end to end
        socket = pusher(context, live.endpoint)
        announce(socket, meta, "p")
        socket.send_multipart(batch_frames(meta, "p", 1, tensors))
        first = live.next_batch(timeout=5)
    first["mask_ratio"].zero_()  # float32 stays float32: this is where a view would show
    assert int(first["x"].sum()) == int(tensors["x"].sum())


@pytest.mark.parametrize("every_s,batches_with_stats", [(0.0, "all"), (3600.0, "first")])
def test_batch_statistics_are_computed_per_interval_and_the_histogram_sees_every_row(context, monkeypatch, every_s, batches_with_stats):
    monkeypatch.setattr("trainer.data.intake.STATS_EVERY_S", every_s)
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    rng = np.random.default_rng(13)
    messages = [make_tensors(meta, 4, rng) for _ in range(6)]
    seen = []
    with consumer(4) as c:
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "p")
        for seq, tensors in enumerate(messages, start=1):
            socket.send_multipart(batch_frames(meta, "p", seq, tensors))
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
    with consumer(4, max_frame_bytes=1 << 20) as c:
        hostile = pusher(context, c.endpoint)
        hostile.send_multipart([b"\x80", bytes(4 << 20)])  # a 4 MiB frame against a 1 MiB limit
        good = pusher(context, c.endpoint)
        tensors = make_tensors(meta, 4, rng)
        announce(good, meta, "good")
        good.send_multipart(batch_frames(meta, "good", 1, tensors))
        first = c.next_batch(timeout=5)
        stats = c.stats().to_dict()
    np.testing.assert_array_equal(first["x"].numpy(), tensors["x"])
    assert stats["received"] == 2 and stats["rejected_total"] == 0 and set(stats["producers"]) == {"good"}


def test_per_producer_accounting_counts_consumed_and_rejected_messages(context):
    meta = make_meta(block_size=32, rows_per_message=4, val_messages=0)
    other = make_meta(rows_per_message=4, val_messages=0, block_size=meta.block_size * 2)
    rng = np.random.default_rng(15)
    with consumer(4) as c:
        socket = pusher(context, c.endpoint)
        announce(socket, meta, "good")
        for seq in range(1, 4):
            socket.send_multipart(batch_frames(meta, "good", seq, make_tensors(meta, 4, rng)))
        announce(socket, other, "foreign")
        for seq in range(1, 3):
            socket.send_multipart(batch_frames(other, "foreign", seq, make_tensors(other, 4, rng)))
        socket.send_multipart([b"garbage"])
        bad = make_tensors(meta, 4, rng)
        bad["x"] = bad["x"].copy()
        bad["x"][0, 0] = meta.vocab_size  # an id outside the vocabulary
        socket.send_multipart(batch_frames(meta, "good", 4, bad))
        batches = [c.next_batch(timeout=5) for _ in range(2)]
        wait_until(lambda: c.stats().to_dict()["received"] == 9)
        stats = c.stats().to_dict()
    assert len(batches) == 2
    assert stats["producers"]["good"]["consumed"] == 2 and stats["producers"]["good"]["messages"] == 4
    assert "foreign" not in stats["producers"]
    assert stats["rejected_by_producer"] == {"foreign": {"meta_mismatch": 3}, "good": {"value_range": 1}}
    assert stats["rejected"] == {"meta_mismatch": 3, "frame_count": 1, "value_range": 1}  # the garbage names no producer
