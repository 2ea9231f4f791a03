"""Issue 26: a prepared folder that changes under a running producer, and prepare's own faults
(real ``python -m producer`` processes on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import time

import zmq

from helpers.processes import free_port, run_module


def _prepare(tmp_path, lines: int = 20_000):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of the corpus\n" for i in range(lines)))
    done = run_module("producer", "prepare", "--corpus", corpus, "--out", tmp_path / "P", "--tokenizer", "bytes",
                      "--workers", "1")
    assert done.returncode == 0, done.stderr
    return tmp_path / "P"


def test_a_prepared_folder_truncated_under_a_running_producer_stops_it_with_a_line_not_sigbus(tmp_path, children):
    folder = _prepare(tmp_path)
    port = free_port()
    context = zmq.Context.instance()
    pull = context.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    try:
        producer = children.start("producer", "run", "--connect", f"tcp://127.0.0.1:{port}", "--corpus", folder,
                                   "--block-size", "64", "--rows-per-message", "8", "--producer-id", "victim")
        pull.setsockopt(zmq.RCVTIMEO, 30_000)
        for _ in range(20):
            pull.recv_multipart()
        os.truncate(folder / "tokens.npy", 4096)  # what an rsync or a second prepare in place would do
        deadline = time.monotonic() + 30
        pull.setsockopt(zmq.RCVTIMEO, 200)
        while producer.alive() and time.monotonic() < deadline:
            try:
                pull.recv_multipart()
            except zmq.Again:
                pass
        code = producer.wait(5)
    finally:
        pull.close(0)
    assert code == 2, f"exit {code} (SIGBUS is {-signal.SIGBUS})\n{producer.output()}"
    line = producer.wait_for_line("stopping:")
    assert str(folder / "tokens.npy") in line and "shrank" in line and "must not change" in line
    assert "Traceback" not in producer.text()
