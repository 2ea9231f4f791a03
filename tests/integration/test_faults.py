"""The fault matrix (issue 9): real ``python -m trainer`` and ``python -m producer run``
processes on 127.0.0.1, a fault injected, and the numbers in ``GET /diagnostics``, the
processes' own summary lines and the files left behind checked afterwards.

What test_streaming.py (consumer-level) and test_stack.py (launcher) already cover is not
repeated here. docs/RELIABILITY.md lists every number these tests assert. The ``cluster``
fixture (conftest.py) is a :class:`helpers.processes.Cluster`.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq

from shared.recording import RecordingReader

from helpers import ROOT
from helpers.processes import TINY_MODEL, free_port, last_status_count
from helpers.wire import make_frames, make_meta, meta_frames, recorded_batches

pytestmark = pytest.mark.slow

RSS_SLACK_KIB = 4096  # a blocked producer's RSS may move this much (allocator noise), no more
FLOOD_PER_KIND = 50
START_TIMEOUT = 60
# One TINY_DATA batch on the wire: tensors (8 rows x 32 x (2+2+1) bytes + 8 x 4 = 1,312) plus
# a header of about 276 bytes (it names the meta by digest).
MESSAGE_BYTES = 1_312 + 276
LOST_IN_FLIGHT_LIMIT_BYTES = 16 << 20


def checkpoint_step(path) -> int:
    """Loads a checkpoint the way ``--resume`` does (weights only) and returns its step."""
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def test_producer_sigkill_and_restart_every_message_accounted(cluster, tmp_path):
    """received + gaps = sent for every producer, the killed one included (by its last received seq)."""
    trainer, diagnostics = cluster.trainer(tmp_path / "run")
    doomed = cluster.producer("doomed")
    steady = cluster.producer("steady", "--max-messages", "120")
    diagnostics.wait_for(lambda s: s["step"] >= 5 and "doomed" in s["stream"]["producers"], "both producers")
    doomed.stop(signal.SIGKILL)
    at_kill = diagnostics.get()["step"]
    diagnostics.wait_for_step(at_kill + 10)  # training goes on with one producer
    restarted = cluster.producer("restarted", "--max-messages", "60")
    assert steady.wait(60) == 0 and restarted.wait(60) == 0
    summaries = {"steady": steady.json_line("summary "), "restarted": restarted.json_line("summary ")}
    # --max-messages counts batches; each producer's meta messages come on top.
    assert {name: s["messages_handed_to_zeromq"] - s["by_split"]["meta"] for name, s in summaries.items()} == {"steady": 120,
                                                                                                               "restarted": 60}
    sent = {name: s["messages_handed_to_zeromq"] for name, s in summaries.items()}
    final = diagnostics.wait_for(
        lambda s: all(s["stream"]["producers"].get(name, {}).get("messages") == n for name, n in sent.items()),
        "every sent message to arrive", timeout=30)
    stream, rows = final["stream"], final["stream"]["producers"]
    assert set(rows) == {"doomed", "steady", "restarted"}
    for name, n in sent.items():
        assert rows[name]["messages"] + rows[name]["gaps"] == n and rows[name]["gaps"] == 0
        assert rows[name]["meta"] == summaries[name]["by_split"]["meta"]
        assert rows[name]["val"] == summaries[name]["by_split"].get("val", 0)
        assert rows[name]["first_seq"] == 0 and rows[name]["last_seq"] == n - 1
    doomed_row = rows["doomed"]  # no summary after SIGKILL: what it demonstrably sent is last_seq + 1
    assert doomed_row["first_seq"] == 0 and doomed_row["gaps"] == 0
    assert doomed_row["messages"] == doomed_row["last_seq"] + 1
    assert stream["received"] + stream["gaps"] == sum(sent.values()) + doomed_row["last_seq"] + 1
    assert stream["received"] == stream["accepted"] and stream["rejected_total"] == 0 and stream["duplicates"] == 0
    # Whatever the killed producer held went to the others (after --silence-s); nothing came unordered.
    assert stream["orders_unordered"] == 0
    assert sum(row["orders_delivered"] for row in rows.values()) == stream["orders_delivered"]
    assert final["step"] > at_kill + 10 and trainer.alive()
    assert trainer.stop() == 143


def test_trainer_sigkill_then_resume_while_producers_wait(cluster, tmp_path):
    run = tmp_path / "run"
    first, diagnostics = cluster.trainer(run)
    producers = [cluster.producer(name) for name in ("p1", "p2")]
    before_kill = diagnostics.wait_for(lambda s: s["step"] >= 12 and len(s["stream"]["producers"]) == 2, "12 steps")
    first.stop(signal.SIGKILL)
    resume_step = checkpoint_step(run / "ckpt.pt")
    assert resume_step >= 10 and resume_step % 10 == 0

    time.sleep(0.5)  # what was ordered is sent; from here on nobody orders anything
    blocked_rss = [p.rss_kib() for p in producers]
    blocked_sent = [last_status_count(p) for p in producers]
    time.sleep(1.5)
    # No trainer, no orders: nothing is sent but a meta message every 2 s.
    assert all(now - then <= 1 for now, then in zip([last_status_count(p) for p in producers], blocked_sent))
    assert all(abs(p.rss_kib() - rss) < RSS_SLACK_KIB for p, rss in zip(producers, blocked_rss))

    second, _ = cluster.trainer(run, "--resume", "--max-iters", str(resume_step + 10))
    assert second.wait(START_TIMEOUT) == 0, second.output()
    second.wait_for_line(f"resumed from {run / 'ckpt.pt'} at step {resume_step}", 1)
    # Batch 8 of 8-row messages: the data resumes at train message k = the step (not where the producers were).
    second.wait_for_line(f"data resumes at train message k={resume_step} (0 rows of it used)", 1)
    summary = second.json_line("done: ")
    assert summary["steps"] == resume_step + 10 and checkpoint_step(run / "ckpt.pt") == resume_step + 10
    rows = summary["stream"]["producers"]
    assert set(rows) == {"p1", "p2"}
    for name, row in rows.items():
        old = before_kill["stream"]["producers"][name]
        assert row["first_seq"] > old["last_seq"], "the same producer went on, it did not restart"
        assert row["gaps"] == 0 and row["duplicates"] == 0
        # In flight when the first trainer died: what was ordered and not yet received. It is
        # ordered again by the resumed trainer (nothing is lost), and bounded by the orders.
        lost = row["first_seq"] - old["last_seq"] - 1
        assert lost * MESSAGE_BYTES < LOST_IN_FLIGHT_LIMIT_BYTES
    assert all(p.alive() for p in producers)
    assert all(abs(p.rss_kib() - rss) < RSS_SLACK_KIB for p, rss in zip(producers, blocked_rss))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == resume_step + 10 and max(steps) == resume_step + 10  # appended after the resume
    for proc in producers:
        assert proc.stop() == 0 and proc.json_line("summary ")["stopped_by_signal"]


def test_flood_and_foreign_producers_are_rejected_by_reason_while_training_goes_on(cluster, tmp_path):
    trainer, diagnostics = cluster.trainer(tmp_path / "run")
    cluster.producer("good")
    diagnostics.wait_for_step(5)

    other_block = cluster.producer("other-block", "--block-size", "64")
    corpus = tmp_path / "other.txt"
    corpus.write_text("".join(f"line {i} of another corpus, with UPPER case\n" for i in range(400)))
    other_corpus = cluster.producer("other-corpus", "--corpus", str(corpus))
    # Refused, and told: each says so in its own log, with the trainer's reason; no order ever comes.
    for proc in (other_block, other_corpus):
        proc.wait_for_line("refuses this producer's messages (meta_mismatch)", 30)
    sent = flood(cluster.endpoint, lambda: diagnostics.wait_for(
        lambda s: all(s["stream"]["rejected"].get(reason) == FLOOD_PER_KIND for reason in FLOOD_KINDS), "the flood", timeout=60))
    for proc in (other_block, other_corpus):
        summary = proc.json_line("summary ") if proc.stop() == 0 else None
        assert summary and summary["by_split"].get("train", 0) == 0 and "meta_mismatch" in summary["links"][0]["refused"]
    final = diagnostics.get()
    assert all(final["stream"]["rejected"][reason] == n for reason, n in sent.items())
    after_flood = diagnostics.wait_for_step(final["step"] + 10)  # training goes on
    stream = after_flood["stream"]
    assert set(stream["producers"]) == {"good"}
    assert stream["producers"]["good"]["gaps"] == 0 and stream["duplicates"] == 0
    assert stream["rejected"]["meta_mismatch"] >= 3  # the foreign producers' and the flooder's meta messages
    assert stream["rejected_total"] == 4 * FLOOD_PER_KIND + stream["rejected"]["meta_mismatch"]
    assert stream["received"] == stream["accepted"] + stream["rejected_total"]
    block_line = trainer.wait_for_line("producer 'other-block': field block_size is 64, the pinned stream has 32", 1)
    assert "meta_mismatch" in block_line
    corpus_line = trainer.wait_for_line("producer 'other-corpus': field ", 1)
    assert "corpus_fingerprint" in corpus_line
    assert trainer.stop() == 143


FLOOD_KINDS = ("frame_count", "header_not_msgpack", "shape", "size")


def flood(endpoint: str, until) -> dict[str, int]:
    """A misbehaving client: its meta message (another stream: a meta mismatch, but the meta is
    remembered, so its batches are checked in full), then FLOOD_PER_KIND messages of each of four
    broken kinds, its connection held open until ``until()`` returns (ZeroMQ's ROUTER drops what a
    peer that disconnected had queued and the trainer not yet read); returns the rejection reason
    each kind must get and how many were sent."""
    rng = np.random.default_rng(9)
    meta = make_meta(block_size=32, rows_per_message=8)
    valid = [bytes(frame) for frame in make_frames(meta, "flooder", 0, rng)]
    header = msgpack.unpackb(valid[0])
    header["tensors"][0]["shape"] = [10**9, 32]  # a huge declared shape
    huge = [msgpack.packb(header), *valid[1:]]
    truncated = valid[:2] + [valid[2][:7]] + valid[3:]
    kinds = {
        "frame_count": lambda: [rng.bytes(100)],
        "header_not_msgpack": lambda: [b"\xc1" + rng.bytes(40), b"", b"", b"", b""],
        "shape": lambda: huge,
        "size": lambda: truncated,
    }
    with zmq.Context() as context:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.SNDTIMEO, 20_000)
        socket.connect(endpoint)
        socket.send_multipart(meta_frames(meta, "flooder"))
        for _ in range(FLOOD_PER_KIND):
            for make in kinds.values():
                socket.send_multipart(make())
        until()
        socket.close(linger=0)
    return {reason: FLOOD_PER_KIND for reason in kinds}


def test_run_directory_that_cannot_be_created(cluster, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    trainer, _ = cluster.trainer(blocker / "run")
    assert trainer.wait(START_TIMEOUT) == 2
    text = "\n".join(trainer.lines)
    assert "refusing to train" in text and str(blocker / "run") in text and "Not a directory" in text
    assert "Traceback" not in text
    assert blocker.read_text() == "not a directory"


def test_a_second_trainer_on_the_same_run_folder_is_refused_naming_the_first(cluster, tmp_path):
    """Issue 26 item 6: both used to run, interleaving metrics.jsonl into invalid JSON."""
    run = tmp_path / "run"
    first, diagnostics = cluster.trainer(run)
    cluster.producer("p")
    diagnostics.wait_for_step(5)
    second = cluster.start("trainer", "--bind", f"tcp://127.0.0.1:{free_port()}", "--out-dir", run, "--http-port",
                           free_port(), *TINY_MODEL, name="second")
    assert second.wait(START_TIMEOUT) == 2
    line = second.wait_for_line("refusing to train")
    assert f"{run} is in use by another trainer (pid {first.pid} on host {socket.gethostname()}, started 20" in line
    assert "Traceback" not in second.text()
    step = diagnostics.get()["step"]
    diagnostics.wait_for(lambda s: s["step"] >= step + 5 and (run / "ckpt.pt").exists(), "more steps and a checkpoint")
    first.kill()  # SIGKILL: the kernel releases the lock; the file it leaves names a dead process
    first.popen.wait(10)
    again, diagnostics = cluster.trainer(run, "--resume")
    diagnostics.wait_for_step(step + 6)
    assert f"pid {again.pid} on host" in (run / "trainer.lock").read_text()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_disk_full_mid_run_leaves_the_last_checkpoint_intact(cluster, tmp_path):
    """RLIMIT_FSIZE on the running trainer stands in for a full disk: every write past the
    limit fails with EFBIG, as on a full file system."""
    run = tmp_path / "run"
    trainer, diagnostics = cluster.trainer(run, "--eval-interval", "30")
    cluster.producer("p")
    diagnostics.wait_for(lambda s: s["step"] >= 31 and (run / "ckpt.pt").exists(), "the first checkpoint")
    trainer.popen.send_signal(signal.SIGSTOP)  # no checkpoint may land between reading it and the limit
    good_step = checkpoint_step(run / "ckpt.pt")
    size = (run / "ckpt.pt").stat().st_size
    limit = (run / "metrics.jsonl").stat().st_size + 64 * 1024
    assert limit < size, "the checkpoint must be bigger than the limit for this test to bite"
    resource.prlimit(trainer.pid, resource.RLIMIT_FSIZE, (limit, limit))
    trainer.popen.send_signal(signal.SIGCONT)
    assert trainer.wait(START_TIMEOUT) == 1
    text = "\n".join(trainer.lines)
    assert "stopping: could not write the checkpoint" in text and "Traceback" not in text
    assert good_step >= 30 and good_step % 30 == 0 and checkpoint_step(run / "ckpt.pt") == good_step
    assert (run / "ckpt.pt").stat().st_size == size
    assert not (run / "ckpt.pt.tmp").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.parametrize(("stop", "code", "stopped_by"), [(signal.SIGINT, 130, "KeyboardInterrupt"),
                                                         (signal.SIGTERM, 143, "SystemExit")])
def test_a_signal_between_evals_checkpoints_the_step_reached(cluster, tmp_path, stop, code, stopped_by):
    run = tmp_path / "run"
    trainer, diagnostics = cluster.trainer(run, "--eval-interval", "1000")
    cluster.producer("p")
    reached = diagnostics.wait_for_step(25)["step"]
    trainer.popen.send_signal(stop)
    assert trainer.wait() == code, trainer.output()
    summary = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["kind"] == "summary" and summary["stopped_by"] == stopped_by
    assert summary["steps"] >= reached and checkpoint_step(run / "ckpt.pt") == summary["steps"]  # no eval since step 0
    assert f"{stopped_by} at step {summary['steps']}: checkpoint written to " in trainer.text()
    assert "Traceback" not in trainer.text() and not (run / "ckpt.pt.tmp").exists()


def test_sigint_while_waiting_for_data_stops_at_once_with_a_checkpoint(cluster, tmp_path):
    run = tmp_path / "run"
    trainer, diagnostics = cluster.trainer(run, "--eval-interval", "1000")
    assert cluster.producer("p", "--max-messages", "100").wait(START_TIMEOUT) == 0  # the val set, then train batches
    starved = diagnostics.wait_for(lambda s: s["stream"]["starved"], "the trainer to wait for data")
    trainer.popen.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert trainer.wait() == 130, trainer.output()
    assert time.monotonic() - sent < 3.0
    assert checkpoint_step(run / "ckpt.pt") == starved["step"] > 0
    waiting, _ = cluster.trainer(tmp_path / "never")  # no producer: Ctrl-C while it waits for the stream
    waiting.wait_for_line("waiting for the stream meta", START_TIMEOUT)
    waiting.popen.send_signal(signal.SIGINT)
    assert waiting.wait() == 130 and "Traceback" not in waiting.text()


def test_sigterm_to_every_process_leaves_complete_files(cluster, tmp_path):
    run = tmp_path / "run"
    recording = tmp_path / "stream.lprec"
    trainer, diagnostics = cluster.trainer(run, "--record", str(recording))
    producers = [cluster.producer(name) for name in ("p1", "p2")]
    polled = diagnostics.wait_for(lambda s: s["step"] >= 12 and (run / "ckpt.pt").exists(), "12 steps and a checkpoint")
    for proc in [trainer, *producers]:
        proc.popen.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert trainer.wait() == 143, trainer.output()
    assert [proc.wait() for proc in producers] == [0, 0]
    assert time.monotonic() - started < 5.0
    summaries = [proc.json_line("summary ") for proc in producers]
    assert all(s["stopped_by_signal"] and s["messages_handed_to_zeromq"] > 0 for s in summaries)

    assert checkpoint_step(run / "ckpt.pt") >= 10  # a signal during a save leaves at most a stray ckpt.pt.tmp
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]  # the accounting is written even when a signal ends the run
    assert summary["kind"] == "summary" and summary["stopped_by"] == "SystemExit" and summary["steps"] >= 12
    assert summary["stream"]["received"] >= summary["stream"]["consumed_messages"] > 0
    assert set(summary["stream"]["producers"]) == {"p1", "p2"}
    assert any(line.startswith("stopped: ") or " stopped: {" in line for line in trainer.lines)
    with RecordingReader(recording) as reader:
        messages = recorded_batches(reader)
        report = reader.report
    assert not report.truncated and report.corrupt_records == 0 and not report.problem and report.lost_bytes == 0
    final = summary["stream"]  # what was handed out: every consumed train message, each val message once
    train_records = sum(m.split == "train" for m in messages)
    # A signal can land between recording a batch's messages and counting them: at most one batch apart.
    assert final["consumed_messages"] <= train_records <= final["consumed_messages"] + 2
    assert final["consumed_messages"] >= polled["stream"]["consumed_messages"]
    assert sorted(m.val_index for m in messages if m.split == "val") == list(range(final["val_messages_total"]))
    assert {m.producer_id for m in messages} <= {"p1", "p2"}
    # The schedule, in order: train messages k = 0, 1, 2, ..., none twice, none skipped.
    assert [m.index for m in messages if m.split == "train"] == list(range(train_records))
    sent = {s["producer_id"]: s["messages_handed_to_zeromq"] for s in summaries}
    assert all(m.seq < sent[m.producer_id] for m in messages)


def test_soak_short(tmp_path):
    """benchmarks/soak.py for 6 s of training: flat RSS after warm-up; no gaps, duplicates or
    rejects, and what was sent but not yet received fits in the socket buffers."""
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--minutes", "0.1", "--sample-every", "0.5", "--producers", "2",
         "--drain-timeout", "1", "--out-dir", str(tmp_path / "soak"), "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    accounting = report["accounting"]
    assert report["flat"] and report["accounted"] and report["steps"] > 0
    assert accounting["gaps"] == accounting["duplicates"] == accounting["rejected"] == 0
    assert accounting["received"] > 0
    # Not received when the trainer stopped (nothing lost: no gaps) must fit in what the sockets
    # between them can hold: their buffers, not an unbounded queue somewhere.
    assert 0 <= accounting["sent"] - accounting["received"] and report["in_flight_bytes"] < 32 << 20
    assert set(report["rss_kib"]) == {"trainer", "producer-0", "producer-1"} and report["samples"] >= 10
    assert all(growth < 16 << 10 for growth in report["rss_growth_after_warmup_kib"].values())
