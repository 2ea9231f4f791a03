"""Transport throughput: one sender process to one receiver over TCP loopback.

    python benchmarks/transport.py [--block-size 1024] [--rows 64] [--seconds 4]

Measures, in one run and for the same frame sizes:

1. ``raw pyzmq``: PUSH -> PULL of pre-built frames with ``copy=False`` (default HWMs),
   nothing decoded: the ceiling for this machine.
2. ``producer socket``: the producer's socket (``producer.sending.Link``, a DEALER) sending
   pre-built tensors under a fresh header per message (``shared.wire.encode``, seq 0, 1, ...)
   without waiting for orders, received by a ROUTER socket with the consumer's RCVHWM that only counts.
3. ``wire decode``: the same, and the receiver runs ``shared.wire.decode`` (full validation).
4. ``consumer``: a producer's :class:`~producer.sending.Worker` serving the orders of
   ``trainer.data.consumer.DatasetConsumer`` (orders with credit, validation, meta pinning,
   accounting, the reorder buffer, batch assembly, batch statistics) and ``next_batch()`` on
   CPU, ``batch_size`` = rows per message: the whole protocol of docs/PROTOCOL.md §6.

The sender re-sends a pool of pre-built messages, so the producer's generation speed
(``benchmarks/producer.py``) is not part of these numbers. Payload = tensor bytes
(x, y, attention_mask, mask_ratio); headers are not counted. The four paths take turns
``--repeats`` times and each reports its best run, because a shared host is noisy.
Each row also has the CPU microseconds per message of the receiving process (all its threads)
and of the sender process, and what the host's cores offered per message at that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from itertools import count
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.stream import BatchStream  # noqa: E402
from shared.data_config import DataConfig  # noqa: E402
from shared.wire import MetaMessage, decode, encode, encode_meta  # noqa: E402

POOL = 8  # distinct pre-built messages the sender cycles through


def build_pool(block_size: int, rows: int):
    stream = BatchStream(DataConfig(block_size=block_size, rows_per_message=rows, producer_id="bench"))
    batches = stream.train_batches()
    return stream.meta, [next(batches) for _ in range(POOL)]


def payload_bytes(tensors) -> int:
    return sum(array.nbytes for array in tensors.values())


def run_sender(args) -> None:
    """Child process: sends until killed."""
    meta, pool = build_pool(args.block_size, args.rows)
    if args.role == "raw":
        context = zmq.Context()
        socket = context.socket(zmq.PUSH)
        socket.connect(args.endpoint)
        header = encode(meta, "train", "bench", 0, pool[0], 0)[0]
        frames = [[header, *tensors.values()] for tensors in pool]
        for i in count():
            socket.send_multipart(frames[i % POOL], copy=False)
    elif args.role == "wire":
        from producer.sending import Link, StopSignal

        link = Link(args.endpoint, None, StopSignal())
        link.send(encode_meta(meta, "bench", 0))  # as a producer does: the meta message, then the batches
        for seq in count(1):
            if not link.send(encode(meta, "train", "bench", seq, pool[seq % POOL], seq - 1)):
                break
        link.close()
    else:
        from producer.sending import Link, StopSignal, Throughput, Worker

        class Pool:
            def __init__(self) -> None:
                self.meta = meta

            def message(self, split, index):
                return pool[index % POOL]

        stop = StopSignal()
        links = [Link(args.endpoint, None, stop)]
        worker = Worker(links, Pool(), "bench", Throughput("bench", links, 3600))
        worker.serve(stop)
        worker.close()


def start_sender(role: str, endpoint: str, args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--endpoint", endpoint, "--block-size", str(args.block_size), "--rows", str(args.rows)]
    )


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(receive_one, seconds: float, sender_pid: int) -> dict:
    """Calls ``receive_one()`` (returns messages taken) for ``seconds`` after a 1 s warm-up.

    Returns ``messages``, ``elapsed`` (s) and the CPU seconds over the timed part of this
    receiving process (every thread: ZeroMQ's I/O thread, a consumer's receive thread) and of
    the sender process.
    """
    warm_until = time.monotonic() + 1.0
    while time.monotonic() < warm_until:
        receive_one()
    messages, started = 0, time.perf_counter()
    receiver_cpu, sender_cpu = time.process_time(), process_cpu_s(sender_pid)
    while time.perf_counter() - started < seconds:
        messages += receive_one()
    sender_end = process_cpu_s(sender_pid)
    return {
        "messages": messages,
        "elapsed": time.perf_counter() - started,
        "receiver_cpu": time.process_time() - receiver_cpu,
        "sender_cpu": None if sender_cpu is None or sender_end is None else sender_end - sender_cpu,
    }


def bench_raw(args, message_bytes: int) -> dict:
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    sender = start_sender("raw", f"tcp://127.0.0.1:{port}", args)
    try:
        measured = measure(lambda: (socket.recv_multipart(copy=False), 1)[1], args.seconds, sender.pid)
    finally:
        sender.kill()
        sender.wait()
        socket.close(linger=0)
        context.term()
    return result("raw pyzmq", measured, message_bytes)


def bench_wire(args, message_bytes: int, validate: bool) -> dict:
    """The producer's sender into a PULL socket with the consumer's RCVHWM; ``validate``: decode each
    (the meta message first, then the batches that name it)."""
    from trainer.data.receiver import RECEIVE_HWM

    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    sender = start_sender("wire", f"tcp://127.0.0.1:{port}", args)
    metas = {}

    def take() -> int:
        _, *frames = socket.recv_multipart(copy=False)
        if not validate:
            return 1
        message = decode(frames, metas)
        if isinstance(message, MetaMessage):
            metas[message.meta.digest] = message.meta
            return 0
        return 1

    try:
        measured = measure(take, args.seconds, sender.pid)
    finally:
        sender.kill()
        sender.wait()
        socket.close(linger=0)
        context.term()
    return result("wire decode" if validate else "producer socket", measured, message_bytes)


def bench_socket(args, message_bytes: int) -> dict:
    return bench_wire(args, message_bytes, validate=False)


def bench_decode(args, message_bytes: int) -> dict:
    return bench_wire(args, message_bytes, validate=True)


def bench_consumer(args, message_bytes: int) -> dict:
    from trainer.data.consumer import DatasetConsumer

    with DatasetConsumer("tcp://127.0.0.1:*", args.rows) as consumer:
        sender = start_sender("worker", consumer.endpoint, args)
        try:
            measured = measure(lambda: (consumer.next_batch(timeout=30), 1)[1], args.seconds, sender.pid)
            stats = consumer.stats()
        finally:
            sender.terminate()
            sender.wait()
    assert stats.gaps == 0 and stats.rejected_total == 0, stats
    return result("consumer", measured, message_bytes)


def result(name: str, measured: dict, message_bytes: int) -> dict:
    """One path's row: rates, and CPU microseconds per message of the receiver and the sender
    next to the wall-clock microseconds per message times the cores (what the host offered)."""
    messages, elapsed = measured["messages"], measured["elapsed"]
    per_message_us = 1e6 / messages
    return {
        "path": name,
        "messages_per_s": round(messages / elapsed, 1),
        "payload_GB_per_s": round(messages * message_bytes / elapsed / 1e9, 3),
        "receiver_cpu_us_per_message": round(measured["receiver_cpu"] * per_message_us, 1),
        "sender_cpu_us_per_message": None if measured["sender_cpu"] is None else round(measured["sender_cpu"] * per_message_us, 1),
        "offered_cpu_us_per_message": round(elapsed * (os.cpu_count() or 1) * per_message_us, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=64, help="rows per message (= batch size for the consumer)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per path (after 1 s warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path; the best one is reported")
    parser.add_argument("--role", choices=("raw", "wire", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_sender(args)
        return
    meta, pool = build_pool(args.block_size, args.rows)
    message_bytes = payload_bytes(pool[0])
    header_bytes = len(encode(meta, "train", "bench", 0, pool[0], 0)[0])
    # The paths take turns, --repeats times; each keeps its best run (the host may be shared).
    rows = []
    for _ in range(args.repeats):
        runs = [bench(args, message_bytes) for bench in (bench_raw, bench_socket, bench_decode, bench_consumer)]
        rows = [max(pair, key=lambda row: row["messages_per_s"]) for pair in zip(rows, runs)] if rows else runs
    raw = rows[0]["payload_GB_per_s"]
    for row in rows:
        row["of_raw"] = round(row["payload_GB_per_s"] / raw, 3)
        row["batches_per_s"] = row["messages_per_s"]  # one message per batch here
    print(json.dumps({
        "block_size": args.block_size, "rows_per_message": args.rows, "payload_bytes_per_message": message_bytes,
        "header_bytes_per_message": header_bytes, "cpus": os.cpu_count(), "load_average": os.getloadavg(), "results": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
