"""Real processes, real sockets on 127.0.0.1: `python -m producer run` feeding DatasetConsumer."""

import signal
import time

import numpy as np
import pytest
import zmq

from shared.wire import encode
from trainer.data.consumer import DatasetConsumer

from helpers import wait_until
from helpers.processes import Children, Process, final_json, free_port, run_module
from helpers.wire import make_frames, make_meta, make_tensors, meta_frames

pytestmark = pytest.mark.slow
SMALL = ["--block-size", "64", "--rows-per-message", "3"]


class Producers:
    """``python -m producer run`` children on SMALL rows, without ``--producer-id`` (each picks its own)."""

    def __init__(self, children: Children) -> None:
        self.children = children

    def start(self, endpoint, *flags, bind=False) -> Process:
        return self.children.start("producer", "run", "--bind" if bind else "--connect", endpoint, *SMALL, *flags)

    @staticmethod
    def stop(proc: Process, sig=signal.SIGTERM, timeout=5) -> dict | None:
        """Signals ``proc``, waits for it and returns its summary dict (None after SIGKILL)."""
        proc.stop(sig, timeout)
        return proc.json_line("summary ")


@pytest.fixture
def producers(children):
    return Producers(children)


def consume_until(consumer, predicate, timeout=10.0):
    """Takes batches until ``predicate()`` holds; returns them."""
    batches = []
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        try:
            batches.append(consumer.next_batch(timeout=0.2))
        except TimeoutError:
            pass
    return batches


@pytest.mark.parametrize("rows_per_message,batch_size", [("3", 7), ("16", 5)])
def test_several_producers_feed_one_consumer(producers, rows_per_message, batch_size):
    with DatasetConsumer("tcp://127.0.0.1:*", batch_size) as consumer:
        procs = [producers.start(consumer.endpoint, "--rows-per-message", rows_per_message) for _ in range(3)]
        # Every producer known and ordered train messages (the val set goes first, to whoever came first).
        def all_three_sent_train():
            rows = consumer.stats().to_dict()["producers"].values()
            return len(rows) == 3 and all(row["train"] > 0 for row in rows)

        batches = consume_until(consumer, all_three_sent_train, timeout=20.0)
        batches += [consumer.next_batch(timeout=10) for _ in range(10)]
        summaries = [producers.stop(proc) for proc in procs]
        stats = consumer.stats().to_dict()
    assert all(b["x"].shape == (batch_size, 64) for b in batches)
    assert all(b["attention_mask"].sum(1).min() >= 1 for b in batches)
    assert sorted(stats["producers"]) == sorted(s["producer_id"] for s in summaries)
    assert len(set(stats["producers"])) == 3  # same flags, no --producer-id: distinct ids
    assert stats["gaps"] == 0 and stats["duplicates"] == 0 and stats["rejected_total"] == 0
    assert all(s["stopped_by_signal"] and s["by_split"].get("train", 0) > 0 for s in summaries)
    # Whatever the producers did, the batches are the schedule's: k = 0, 1, 2, ... of the one stream.
    from producer.stream import BatchStream
    from shared.data_config import DataConfig

    stream = BatchStream(DataConfig(block_size=64, rows_per_message=int(rows_per_message)))
    rows = np.concatenate([stream.train_message(k)["x"] for k in range(-(-len(batches) * batch_size // int(rows_per_message)))])
    np.testing.assert_array_equal(np.concatenate([b["x"].numpy() for b in batches]), rows[: len(batches) * batch_size])


def test_a_trainer_that_takes_nothing_orders_nothing_and_the_producer_idles_with_flat_memory(producers):
    with DatasetConsumer("tcp://127.0.0.1:*", 4, queue_batches=1) as consumer:
        proc = producers.start(consumer.endpoint, "--block-size", "1024", "--rows-per-message", "16", "--status-every", "0.5")
        consumer.next_batch(timeout=20)  # starts the schedule; then nobody takes batches
        time.sleep(1.0)  # the orders within the window are served
        received, rss = consumer.stats().to_dict()["received"], proc.rss_kib()
        time.sleep(1.5)
        stats = consumer.stats().to_dict()
        # Only its meta messages (every 2 s) arrive: nothing more was ordered.
        assert stats["producers"][next(iter(stats["producers"]))]["train"] == stats["orders_delivered"] - stats["val_messages_total"]
        assert stats["received"] - received <= 1
        assert abs(proc.rss_kib() - rss) < 4096  # KiB
        started = time.monotonic()
        proc.stop(timeout=5)
        assert time.monotonic() - started < 2.0
    lines = proc.lines
    assert lines[-1].startswith("summary ")  # the summary is the last line the producer wrote
    summary = final_json(lines[-1:])
    # What it sent is what was ordered: the val set, the queue, the window ahead; never more.
    assert summary["by_split"]["train"] <= 1 + 1 + 64
    status = [line for line in lines if "msg/s" in line]
    assert len(status) >= 3  # status lines go on while the producer waits for orders


def test_sigterm_stops_a_producer_that_has_no_trainer(producers):
    proc = producers.start("tcp://127.0.0.1:9")  # nothing listens: ZeroMQ keeps retrying
    time.sleep(1.0)
    assert proc.alive()
    started = time.monotonic()
    summary = producers.stop(proc, signal.SIGINT)
    assert time.monotonic() - started < 1.5 and proc.popen.returncode == 0
    assert summary["by_split"].get("train", 0) == 0 and summary["links"][0]["orders"] == 0


def test_a_producer_says_plainly_that_no_trainer_orders_anything(producers, monkeypatch):
    proc = producers.start("tcp://127.0.0.1:9")
    proc.wait_for_line("no trainer has ordered a message for", 20)
    assert "is a trainer running and listening there?" in proc.text()
    producers.stop(proc)


def test_sigterm_stops_a_producer_with_several_absent_trainers_within_one_linger(producers):
    endpoints = ",".join(f"tcp://127.0.0.1:{port}" for port in (9, 11, 13))  # nothing listens on any
    proc = producers.start(endpoints)
    time.sleep(1.0)
    assert proc.alive()
    started = time.monotonic()
    summary = producers.stop(proc)
    assert time.monotonic() - started < 1.5 and proc.popen.returncode == 0  # the three lingers overlap
    assert [link["endpoint"] for link in summary["links"]] == endpoints.split(",")


def test_killed_producer_then_starved_then_recovered(producers):
    with DatasetConsumer("tcp://127.0.0.1:*", 6, starved_after_s=0.5) as consumer:
        first, second = producers.start(consumer.endpoint), producers.start(consumer.endpoint)
        consume_until(consumer, lambda: len(consumer.stats().to_dict()["producers"]) == 2)
        producers.stop(first, signal.SIGKILL)
        before = consumer.stats().to_dict()["received"]
        for _ in range(100):  # 200 messages: more than the --ahead window (64) the consumer may hold already
            consumer.next_batch(timeout=20)
        assert consumer.stats().to_dict()["received"] > before  # the survivor keeps the stream going
        producers.stop(second, signal.SIGKILL)
        consume_until(consumer, lambda: consumer.stats().to_dict()["starved"])  # drains what was buffered
        third = producers.start(consumer.endpoint)
        consumer.next_batch(timeout=10)
        wait_until(lambda: not consumer.stats().to_dict()["starved"])
        stats = consumer.stats().to_dict()
        producers.stop(third)
    assert len(stats["producers"]) == 3 and stats["rejected_total"] == 0
    assert stats["duplicates"] == 0


def test_consumer_restart_while_producers_live(producers):
    consumer = DatasetConsumer("tcp://127.0.0.1:*", 4).start()
    endpoint = consumer.endpoint
    try:
        proc = producers.start(endpoint)
        for _ in range(5):
            consumer.next_batch(timeout=10)
        first_ids = set(consumer.stats().to_dict()["producers"])
    finally:
        consumer.close()
    time.sleep(0.3)
    with DatasetConsumer(endpoint, 4) as restarted:
        for _ in range(5):
            restarted.next_batch(timeout=10)
        stats = restarted.stats().to_dict()
    assert set(stats["producers"]) == first_ids
    row = stats["producers"][next(iter(first_ids))]
    assert row["first_seq"] > 0  # the same producer went on, it did not restart
    assert proc.alive()
    assert producers.stop(proc)["messages_handed_to_zeromq"] >= row["last_seq"] + 1


def test_reverse_topology_producer_binds(producers):
    port = free_port()  # for the producer to bind
    proc = producers.start(f"tcp://127.0.0.1:{port}", bind=True)
    with DatasetConsumer(f"tcp://127.0.0.1:{port}", 5, bind=False) as consumer:
        batch = consumer.next_batch(timeout=10)
    assert batch["x"].shape == (5, 64)
    assert producers.stop(proc)["by_split"]["train"] > 0


def test_bad_messages_next_to_a_live_producer(producers):
    rng = np.random.default_rng(0)
    meta = make_meta(block_size=64, rows_per_message=3)
    with DatasetConsumer("tcp://127.0.0.1:*", 6) as consumer:
        proc = producers.start(consumer.endpoint)
        real_meta = consumer.wait_for_meta(timeout=10)
        truncated = [bytes(f) for f in encode(real_meta, "train", "bad", 0, make_tensors(real_meta, 3, rng), 0)]
        truncated[2] = truncated[2][:10]
        with zmq.Context() as ctx:
            attacker = ctx.socket(zmq.DEALER)
            attacker.connect(consumer.endpoint)
            for frames in ([b"\x00" * 100], [b"\x93\x01\x02\x03", b"", b"", b"", b""], truncated,
                           meta_frames(meta, "bad"), make_frames(meta, "bad", 1, rng),  # another stream: meta mismatch
                           encode(real_meta, "train", "forger", 0, _tensors_beyond_vocab(real_meta, rng), 0)):
                attacker.send_multipart(frames)
                consumer.next_batch(timeout=10)
            wait_until(lambda: consumer.stats().to_dict()["rejected_total"] == 6)
            attacker.close(linger=1000)
        batches = [consumer.next_batch(timeout=10) for _ in range(5)]
        stats = consumer.stats().to_dict()
        producers.stop(proc)
    assert stats["rejected"] == {"frame_count": 1, "header_schema": 1, "size": 1, "meta_mismatch": 2, "value_range": 1}
    assert len(stats["producers"]) == 1 and not {"bad", "forger"} & set(stats["producers"])
    assert stats["gaps"] == 0 and all(b["x"].max() < real_meta.vocab_size for b in batches)


def _tensors_beyond_vocab(meta, rng):
    tensors = make_tensors(meta, 3, rng)
    tensors["x"] = tensors["x"].copy()
    tensors["x"][0, 0] = meta.vocab_size + 5
    return tensors


def test_two_producers_on_the_real_corpus_account_for_every_message(producers):
    """received + counted gaps == what the producers handed to ZeroMQ; every train message used once."""
    with DatasetConsumer("tcp://127.0.0.1:*", 8) as consumer:
        procs = [producers.start(consumer.endpoint, "--block-size", "256", "--rows-per-message", "8", "--max-messages", str(n))
                 for n in (150, 230)]
        consume_until(consumer, lambda: not any(p.alive() for p in procs), timeout=60)
        summaries = [producers.stop(proc) for proc in procs]
        sent = sum(s["messages_handed_to_zeromq"] for s in summaries)
        wait_until(lambda: consumer.stats().to_dict()["received"] == sent)
        stats = consumer.stats().to_dict()
    # --max-messages counts batches; the meta messages (one on connecting, more every --meta-every s) come on top.
    assert [s["messages_handed_to_zeromq"] - s["by_split"]["meta"] for s in summaries] == [150, 230]
    assert stats["received"] + stats["gaps"] == sent and stats["gaps"] == 0
    assert stats["orders_delivered"] == 150 + 230 and stats["orders_duplicate"] == stats["orders_unordered"] == 0
    for summary in summaries:
        row = stats["producers"][summary["producer_id"]]
        assert row["messages"] + row["gaps"] == summary["messages_handed_to_zeromq"]
        assert row["val"] == summary["by_split"].get("val", 0) and row["meta"] == summary["by_split"]["meta"]


def test_a_bad_endpoint_is_a_usage_error_not_a_traceback():
    done = run_module("producer", "run", "--connect", "tcp://127.0.0.1:1,not-an-endpoint", "--max-messages", "1")
    assert done.returncode == 2
    assert "not-an-endpoint" in done.stderr and "tcp://" in done.stderr and "Traceback" not in done.stderr
