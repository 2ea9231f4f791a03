"""Issue 26: a prepared folder that changes under a running producer, and prepare's own faults
(real ``python -m producer`` processes on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import time

import zmq

from shared.wire import MAX_ORDER_COUNT, Order, encode_order

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
    trainer = context.socket(zmq.ROUTER)  # a trainer that orders train messages (docs/PROTOCOL.md §6)
    trainer.bind(f"tcp://127.0.0.1:{port}")
    try:
        producer = children.start("producer", "run", "--connect", f"tcp://127.0.0.1:{port}", "--corpus", folder,
                                   "--block-size", "64", "--rows-per-message", "8", "--producer-id", "victim")
        trainer.setsockopt(zmq.RCVTIMEO, 30_000)
        identity = trainer.recv_multipart()[0]  # its first meta
        trainer.send_multipart([identity, *encode_order(Order("0" * 16, "train", 0, MAX_ORDER_COUNT))])
        for _ in range(20):
            trainer.recv_multipart()
        os.truncate(folder / "tokens.npy", 4096)  # what an rsync or a second prepare in place would do
        deadline = time.monotonic() + 30
        trainer.setsockopt(zmq.RCVTIMEO, 200)
        while producer.alive() and time.monotonic() < deadline:
            try:
                trainer.recv_multipart()
            except zmq.Again:
                pass
        code = producer.wait(5)
    finally:
        trainer.close(0)
    assert code == 2, f"exit {code} (SIGBUS is {-signal.SIGBUS})\n{producer.output()}"
    line = producer.wait_for_line("stopping:")
    assert str(folder / "tokens.npy") in line and "shrank" in line and "must not change" in line
    assert "Traceback" not in producer.text()


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaps counts: it holds no memory and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _big_corpus(path, megabytes: int) -> None:
    line = b"the quick brown fox jumps over the lazy dog, again and again\n"
    with open(path, "wb") as file:
        for _ in range(megabytes):
            file.write(line * (1_000_000 // len(line)))


def _wait(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_killed_prepare_leaves_no_workers_and_the_next_one_removes_its_partial_folder(tmp_path, children):
    """Issue 26 item 7: after SIGKILL both pool workers used to block for ever, reparented to init."""
    corpus = tmp_path / "big.txt"
    _big_corpus(corpus, 150)
    slow = children.start("producer", "prepare", "--corpus", corpus, "--out", tmp_path / "P", "--tokenizer", "char",
                          "--workers", "2", "--chunk-mb", "0.5", name="doomed")
    _wait(lambda: len(_children_of(slow.pid)) >= 2 and list(tmp_path.glob("P.partial-*")), "two workers and a partial folder")
    workers = _children_of(slow.pid)
    slow.kill()
    slow.popen.wait(10)
    _wait(lambda: all(map(_gone, workers)), f"workers {workers} outlived their parent", timeout=10)
    (partial,) = tmp_path.glob("P.partial-*")
    small = tmp_path / "small.txt"
    small.write_text("a small corpus\n" * 100)
    done = run_module("producer", "prepare", "--corpus", small, "--out", tmp_path / "P", "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert f"removing {partial}, left by a prepare that died" in done.stderr
    assert not list(tmp_path.glob("P.partial-*"))


def test_a_second_prepare_to_the_same_out_exits_2_naming_the_first(tmp_path, children):
    corpus = tmp_path / "big.txt"
    _big_corpus(corpus, 150)
    first = children.start("producer", "prepare", "--corpus", corpus, "--out", tmp_path / "P", "--tokenizer", "char",
                           "--workers", "1", name="first")
    _wait(lambda: list(tmp_path.glob("P.partial-*/.owner")), "the first prepare's partial folder")
    second = run_module("producer", "prepare", "--corpus", corpus, "--out", tmp_path / "P", "--workers", "1")
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"another prepare (pid {first.pid} on host" in second.stderr and f"is writing {tmp_path / 'P'}" in second.stderr
    assert first.alive()
    assert first.stop(signal.SIGTERM) == 143
    assert not list(tmp_path.glob("P.partial-*"))


def test_a_full_disk_is_one_line_and_exit_2_leaving_nothing(tmp_path):
    import resource

    corpus = tmp_path / "c.txt"
    _big_corpus(corpus, 2)

    def small_files():  # RLIMIT_FSIZE: every write past 256 KiB fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    done = run_module("producer", "prepare", "--corpus", corpus, "--out", tmp_path / "P", "--tokenizer", "bytes",
                      "--workers", "1", preexec_fn=small_files)
    assert done.returncode == 2, done.stderr
    assert "prepare: the disk is full writing" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "P").exists() and not list(tmp_path.glob("P.partial-*"))
