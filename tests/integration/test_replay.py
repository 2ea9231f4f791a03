"""Record with the consumer, serve with `python -m producer replay`, get the same batches back."""

import json
import time

import numpy as np
import pytest
import torch

from shared.recording import RecordingReader, RecordingWriter
from trainer.data.consumer import DatasetConsumer

from helpers.processes import TINY_MODEL, Process, free_port, run_module
from helpers.wire import make_frames, make_meta, meta_frames, recorded_batches

pytestmark = pytest.mark.slow
FLAGS = ["--block-size", "128", "--rows-per-message", "8"]


def summary_of(proc: Process, timeout=20) -> dict:
    """Waits for a clean exit; the process's ``summary`` dict."""
    assert proc.wait(timeout) == 0, proc.output()
    return proc.summary()


def take(consumer, n):
    return [consumer.next_batch(timeout=10) for _ in range(n)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture
def recorded(tmp_path, children):
    """A recording made by a consumer fed by two live producers: (path, val batches, train batches)."""
    path = tmp_path / "consumed.lpr"
    with DatasetConsumer("tcp://127.0.0.1:*", 5, record_path=str(path)) as consumer:
        procs = [children.start("producer", "run", "--connect", consumer.endpoint, *FLAGS) for _ in range(2)]
        assert consumer.wait_for_val_set(timeout=20)
        val = consumer.val_batches()
        train = []
        deadline = time.monotonic() + 20
        consumed = lambda: [row["consumed"] for row in consumer.stats().to_dict()["producers"].values()]  # noqa: E731
        while (len(consumed()) < 2 or 0 in consumed()) and time.monotonic() < deadline:
            train += take(consumer, 1)  # until train rows of both producers were handed out
        train += take(consumer, 10)
        for proc in procs:
            proc.kill()
    return path, val, train


def test_replay_gives_the_same_batches_in_the_same_order(recorded, children):
    path, val, train = recorded
    with RecordingReader(path) as reader:
        raw = list(reader)
    records = recorded_batches(raw)
    assert len(raw) == len(records) + 1, "the pinned stream's meta message, then the batches"
    assert len({r.producer_id for r in records if r.split == "train"}) == 2  # both producers are in it
    with DatasetConsumer("tcp://127.0.0.1:*", 5) as consumer:
        proc = children.start("producer", "replay", str(path), "--connect", consumer.endpoint)
        assert consumer.wait_for_val_set(timeout=20)
        assert_same_batches(consumer.val_batches(), val)
        assert_same_batches(take(consumer, len(train)), train)
        summary = summary_of(proc)  # it ends when asked for a train message past the file's last
        stats = consumer.stats().to_dict()
    assert summary["records_sent"] == len(raw) - 1 == summary["records_in_file"] - 1  # every batch; its own metas
    assert summary["not_held"] == [f"train {summary['train_messages']}"]
    assert not summary["truncated"] and summary["lost_bytes"] == 0
    assert stats["duplicates"] == 0 and stats["rejected_total"] == 0 and stats["awaiting_meta"] == 0
    assert stats["orders_unordered"] == stats["orders_duplicate"] == 0


def test_replay_of_a_truncated_recording_says_what_was_lost(recorded, tmp_path, children):
    path, _, train = recorded
    with RecordingReader(path) as reader:
        total = sum(1 for _ in reader)
    cut = tmp_path / "cut.lpr"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])  # the recorder died inside the last record
    with DatasetConsumer("tcp://127.0.0.1:*", 5) as consumer:
        proc = children.start("producer", "replay", str(cut), "--connect", consumer.endpoint)
        assert consumer.wait_for_val_set(timeout=20)
        replayed = take(consumer, len(train) - 2)  # the lost last message fed only the last batch
        summary = summary_of(proc)
    assert_same_batches(replayed, train[:-2])
    assert summary["records_sent"] == total - 2 and summary["records_in_file"] == total - 1  # the meta is not re-sent
    assert summary["truncated"] and summary["lost_bytes"] > 1000 - 1


def test_replay_skips_a_corrupt_record_and_loops(tmp_path, children):
    meta = make_meta(block_size=32, val_messages=0)
    rng = np.random.default_rng(0)
    path = tmp_path / "hand.lpr"
    with RecordingWriter(path) as writer:
        writer.write(meta_frames(meta, "p"))
        for seq in range(1, 7):
            writer.write(make_frames(meta, "p", seq, rng, index=seq - 1))
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF  # inside the last record's tensor bytes
    path.write_bytes(bytes(data))
    with DatasetConsumer("tcp://127.0.0.1:*", 4) as consumer:
        proc = children.start("producer", "replay", str(path), "--connect", consumer.endpoint, "--loop", "--rate", "50")
        started = time.monotonic()
        batches = take(consumer, 12)  # k 0..11 from the 5 good records: k mod 5
        elapsed = time.monotonic() - started
        proc.popen.terminate()
        summary = summary_of(proc)
        stats = consumer.stats().to_dict()
    assert elapsed > 11 / 50 - 0.05  # paced by --rate
    assert summary["corrupt_records"] == 1 and summary["records_in_file"] == 6 and summary["train_messages"] == 5
    for k in (5, 6, 10, 11):
        assert torch.equal(batches[k]["x"], batches[k % 5]["x"])
    assert stats["rejected_total"] == 0 and stats["orders_delivered"] >= 12


def test_replay_rejects_a_file_that_is_not_a_recording(tmp_path):
    bogus = tmp_path / "bogus.lpr"
    bogus.write_bytes(b"not a recording at all")
    done = run_module("producer", "replay", bogus, "--connect", "tcp://127.0.0.1:9", timeout=20)
    assert done.returncode == 2 and "not a Linepack recording" in done.stderr


def test_trainer_consume_records_and_reports(tmp_path, children):
    path = tmp_path / "consume.lpr"
    report = tmp_path / "consume.jsonl"  # its stdout: one JSON report a line; its log goes to ``lines``
    consume = children.start("trainer.consume", "--bind", "tcp://127.0.0.1:0", "--batches", "30", "--batch-size", "6",
                             "--record", path, "--val", stdout=report)
    line = consume.wait_for_line("bound to")  # the log line that names the bound port
    endpoint = line.split("bound to ")[1].split(",")[0]
    producer = children.start("producer", "run", "--connect", endpoint, *FLAGS)
    consume.wait(30)
    producer.popen.terminate()
    summary_of(producer)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    final = lines[-1]
    assert final["final"] and final["batches"] == 30 and final["consumed_batches"] == 30
    assert final["val_messages_seen"] == final["val_messages_total"] > 0
    assert final["last_batch"]["rows"] == 6 and final["mask_ratio_cumulative"]["count"] == 180
    with RecordingReader(path) as reader:
        splits = [message.split for message in recorded_batches(reader)]
    assert splits.count("val") == final["val_messages_total"]
    assert splits.count("train") == final["consumed_messages"]


def test_a_recording_made_by_producer_record_replays_into_a_trainer_that_trains(tmp_path, children):
    """The README's chain: ``producer record`` writes the val set too, so a fresh trainer fed by
    ``producer replay`` gets its val set, trains to --max-iters on the recorded train messages and exits 0."""
    recording = tmp_path / "s.lps"
    made = run_module("producer", "record", "--out", recording, "--messages", 40, *FLAGS, timeout=60)
    assert made.returncode == 0, made.stderr
    port = free_port()
    trainer = children.start("trainer", "--bind", f"tcp://127.0.0.1:{port}", "--out-dir", tmp_path / "run", "--http-port", "0",
                             *TINY_MODEL, "--max-iters", "40", "--eval-interval", "20", "--wait-timeout", "30",
                             "--data-timeout", "30")
    replay = children.start("producer", "replay", recording, "--connect", f"tcp://127.0.0.1:{port}")
    assert trainer.wait(120) == 0, trainer.output()
    assert trainer.json_line("done: ")["steps"] == 40
    replay.wait(30)


def test_a_trainer_waiting_for_a_val_set_that_never_comes_says_why_and_gives_up(tmp_path, children):
    """A recording without the val set (as protocol-2 `producer record` made them): the trainer
    says what it waits for and why it may never come, then exits 2 after --wait-timeout."""
    from producer.stream import BatchStream
    from shared.data_config import DataConfig
    from shared.wire import encode, encode_meta

    stream = BatchStream(DataConfig(block_size=128, rows_per_message=8))
    recording = tmp_path / "no-val.lps"
    with RecordingWriter(recording) as writer:
        writer.write(encode_meta(stream.meta, "old", 0))
        for k in range(5):
            writer.write(encode(stream.meta, "train", "old", k + 1, stream.train_message(k), k))
    port = free_port()
    trainer = children.start("trainer", "--bind", f"tcp://127.0.0.1:{port}", "--out-dir", tmp_path / "run", "--http-port", "0",
                             *TINY_MODEL, "--wait-timeout", "12")
    children.start("producer", "replay", recording, "--connect", f"tcp://127.0.0.1:{port}")
    assert trainer.wait(60) == 2
    text = trainer.text()
    assert "waiting for the val set: 0 of" in text and "a replay only if its recording holds them" in text
    assert "no val set arrived within 12 s (--wait-timeout)" in text and "Traceback" not in text
