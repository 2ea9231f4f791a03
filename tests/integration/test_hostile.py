"""A real trainer under the attacks of issue 20, all from 127.0.0.1: descriptor exhaustion on both
ports, forged sequence numbers (many ids, and one under a live producer's id), 20,000 rejected
ids, and the recording path of the README's example. Each test prints what it measured."""

from __future__ import annotations

import json
import os
import resource
import socket
import time

import pytest
import zmq

from producer.stream import BatchStream
from shared.data_config import DataConfig
from shared.recording import RecordingReader
from shared.wire import encode, encode_meta
from trainer.data.receiver import RECEIVE_HWM

from helpers.processes import TINY_DATA, TINY_MODEL, free_port
from helpers.wire import INCARNATION, recorded_batches

pytestmark = pytest.mark.slow
FORGED_SEQ = 1 << 62  # far outside any plausible window


def checkpoint_step(path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def stream_like_the_cluster() -> BatchStream:
    """The stream the cluster's producers send (the built-in corpus, TINY_DATA): the same meta digest."""
    flags = dict(zip(TINY_DATA[::2], TINY_DATA[1::2]))
    return BatchStream(DataConfig(block_size=int(flags["--block-size"]), rows_per_message=int(flags["--rows-per-message"])))


@pytest.fixture
def peer():
    context = zmq.Context()
    sockets = []

    def connect(endpoint: str) -> zmq.Socket:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDTIMEO, 10_000)
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close()
    context.term()


def test_descriptor_exhaustion_on_both_ports_leaves_the_trainer_training_and_checkpointing(cluster, tmp_path):
    run = tmp_path / "run"
    trainer, diagnostics = cluster.trainer(run)
    cluster.producer("p1")
    diagnostics.wait_for(lambda s: s["step"] >= 25 and (run / "ckpt.pt").exists(), "25 steps and a checkpoint")
    http_port = int(diagnostics.url.split(":")[2].split("/")[0])
    limit = 1024  # the attack: 1,100 idle connections at a 1,024-descriptor limit, on each port
    assert open_fds(trainer.pid) < limit // 4
    resource.prlimit(trainer.pid, resource.RLIMIT_NOFILE, (limit, limit))
    lines_before = len(trainer.lines)
    attackers = []
    try:
        for port in (http_port, cluster.port):
            for _ in range(1100):  # past the limit on each port; never a byte sent
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                attackers.append(sock)
        during = diagnostics.wait_for(lambda s: s["step"] >= 0, "an answer while the ports are flooded", timeout=30)
        step_under_attack = during["step"]
        start = checkpoint_step(run / "ckpt.pt")
        diagnostics.wait_for(lambda s: s["step"] >= step_under_attack + 60, "60 more steps under attack", timeout=60)
        deadline = time.monotonic() + 30
        while checkpoint_step(run / "ckpt.pt") <= start and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint_step(run / "ckpt.pt") > start, "no checkpoint was written under attack"
    finally:
        for sock in attackers:
            sock.close()
    logged = len(trainer.lines) - lines_before
    print(f"attack fds: limit {limit}, {len(attackers)} idle connections; checkpoint step {start} -> "
          f"{checkpoint_step(run / 'ckpt.pt')}; {logged} log lines meanwhile")
    assert any("Too many open files" in line for line in trainer.lines[lines_before:]), "the descriptors did run out"
    assert logged < 400, "repeated lines are rate-limited"
    assert trainer.alive() and "Traceback" not in trainer.text()
    assert trainer.stop() == 143


def test_forged_sequence_numbers_cost_little_memory_and_never_poison_a_real_producer(cluster, tmp_path, peer):
    trainer, diagnostics = cluster.trainer(tmp_path / "run")
    cluster.producer("real")
    stream = stream_like_the_cluster()
    ready = diagnostics.wait_for(lambda s: s["step"] >= 50 and "real" in s["stream"]["producers"], "50 steps")
    assert ready["meta"]["digest"] == stream.meta.digest, "the attacker speaks the trainer's stream"
    batches = stream.train_batches()
    attacker = peer(cluster.endpoint)
    rss_before = rss_mib(trainer.pid)
    for index in range(100):  # 100 fresh ids, each seq 0 then seq 2^62: 200 valid messages
        producer = f"forger-{index}"
        attacker.send_multipart(encode_meta(stream.meta, producer, 0, incarnation=INCARNATION))
        attacker.send_multipart(encode(stream.meta, "train", producer, FORGED_SEQ, next(batches), 0, incarnation=INCARNATION))
    real = ready["stream"]["producers"]["real"]
    attacker.send_multipart(encode(stream.meta, "train", "real", FORGED_SEQ, next(batches), 0, incarnation=real["incarnation"]))
    after = diagnostics.wait_for(
        lambda s: s["stream"]["producers"]["real"]["seq_anomalies"] == 1
        and s["stream"]["producers"]["real"]["last_seq"] > real["last_seq"] + 200, "200 genuine messages after the forgery")
    grown = rss_mib(trainer.pid) - rss_before
    row = after["stream"]["producers"]["real"]
    print(f"attack seqs: RSS grew {grown:.1f} MiB after 200 forged messages; the real producer's gaps {row['gaps']}, "
          f"duplicates {row['duplicates']}, anomalies {row['seq_anomalies']}")
    assert row["gaps"] == 0 and row["duplicates"] == 0 and row["out_of_order"] == 0
    assert after["stream"]["gaps"] == 0, "the forgers' jumps are anomalies, not gaps"
    assert after["stream"]["orders_duplicate"] + after["stream"]["orders_unordered"] >= 101, "none of them was trained on"
    assert grown < 20
    assert trainer.stop() == 143


# 20,000 in the attack (and in docs/RELIABILITY.md: LINEPACK_TEST_REJECTED_IDS=20000); 2,000 by
# default, already eight times the 256 ids tracked by name: beside a training loop that holds the
# GIL, the receive thread takes about 5 ms a message, so 20,000 cost a CI run 100 s.
REJECTED_IDS = int(os.environ.get("LINEPACK_TEST_REJECTED_IDS", "2000"))


def test_twenty_thousand_rejected_ids_keep_the_diagnostics_small(cluster, tmp_path, peer):
    trainer, diagnostics = cluster.trainer(tmp_path / "run")
    cluster.producer("real")
    stream = stream_like_the_cluster()
    diagnostics.wait_for_step(5)
    attacker = peer(cluster.endpoint)
    tensors = next(stream.train_batches())
    for index in range(REJECTED_IDS):
        frames = [bytes(memoryview(f).cast("B")) for f in encode(stream.meta, "train", f"id-{index:05d}", 1, tensors, 0)]
        frames[1] = frames[1][:-2]  # a size reject that names its producer
        attacker.send_multipart(frames)
    final = diagnostics.wait_for(lambda s: s["stream"]["rejected"].get("size") == REJECTED_IDS, "the rejects", timeout=180)
    size = len(json.dumps(final))
    print(f"attack ids: /diagnostics is {size} bytes with {REJECTED_IDS} rejected ids")
    assert size < 200_000 and len(final["stream"]["rejected_by_producer"]) <= 257
    assert trainer.stop() == 143
    summary = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["kind"] == "summary" and len(json.dumps(summary)) < 200_000


def test_the_readme_record_example_makes_its_folder_and_resume_appends(cluster, tmp_path):
    run = tmp_path / "runs" / "a"
    recording = run / "stream.lps"  # python -m trainer --bind ... --out-dir runs/a --record runs/a/stream.lps
    first, diagnostics = cluster.trainer(run, "--record", str(recording))
    cluster.producer("p1")
    diagnostics.wait_for(lambda s: s["step"] >= 12 and (run / "ckpt.pt").exists(), "12 steps")
    assert first.stop() == 143
    with RecordingReader(recording) as reader:
        first_run = recorded_batches(reader)
    second, diagnostics = cluster.trainer(run, "--record", str(recording), "--resume")
    diagnostics.wait_for(lambda s: s["step"] >= checkpoint_step(run / "ckpt.pt") + 5, "5 steps after the resume")
    assert second.stop() == 143
    with RecordingReader(recording) as reader:
        both = recorded_batches(reader)
        report = reader.report
    assert len(both) > len(first_run) and [m.seq for m in both[: len(first_run)]] == [m.seq for m in first_run]
    assert report.clean_end and report.corrupt_records == 0

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    third, _ = cluster.trainer(tmp_path / "run3", "--record", str(blocker / "x" / "stream.lps"))
    assert third.wait(60) == 2 and "Traceback" not in third.text() and str(blocker) in third.text()


def test_a_second_trainer_on_the_same_recording_is_refused(cluster, tmp_path):
    recording = tmp_path / "shared.lps"
    first, diagnostics = cluster.trainer(tmp_path / "a", "--record", str(recording))
    cluster.producer("p1")
    diagnostics.wait_for_step(5)
    second = cluster.start("trainer", "--bind", f"tcp://127.0.0.1:{free_port()}", "--out-dir", tmp_path / "b", "--http-port",
                           "0", "--record", recording, *TINY_MODEL, name="second trainer")
    assert second.wait(60) == 2 and "is being written by another process" in second.text()
    assert first.alive() and first.stop() == 143


# ---- issue 26: forged and large metas -------------------------------------------------------

LARGE_METAS = int(os.environ.get("LINEPACK_TEST_LARGE_METAS", "40"))


def steps_per_second(diagnostics, seconds: float) -> float:
    start = diagnostics.get()["step"]
    time.sleep(seconds)
    return (diagnostics.get()["step"] - start) / seconds


def test_a_forged_hf_meta_is_rejected_at_decode_and_large_metas_cost_little(cluster, tmp_path, peer):
    """Issue 26 items 1, 2: a forged hf meta (tokenizer text that does not load, its SHA-256
    matching) used to be pinned and crash the trainer at its first live sample; 40 large valid
    metas (16.8 MB each) left it at 2.9 GiB and 0-0.2 steps/s."""
    import dataclasses
    import hashlib

    import msgpack
    import numpy as np

    from shared.meta import StreamMeta, canonical_json
    from shared.tokenizer import CharTokenizer, sha256_hex

    trainer, diagnostics = cluster.trainer(tmp_path / "run", "--eval-samples", "1")
    cluster.producer("real")
    stream = stream_like_the_cluster()
    diagnostics.wait_for_step(30)
    attacker = peer(cluster.endpoint)
    forged = '{"version": "1.0", "model": "forged"}'
    forgery = {"tokenizer": "hf", "vocab": forged, "tokenizer_digest": sha256_hex(forged.encode())}
    data = {**stream.meta.to_wire(), **forgery}
    digest = hashlib.sha256(canonical_json({**stream.meta.to_dict(), **forgery}).encode()).hexdigest()[:16]
    header = msgpack.unpackb(encode_meta(stream.meta, "forger", 0, incarnation=INCARNATION)[0])
    attacker.send_multipart([msgpack.packb({**header, "meta_hash": digest}), msgpack.packb(data, use_bin_type=True)])
    diagnostics.wait_for(lambda s: s["stream"]["rejected"].get("meta") == 1, "the forged meta rejected (reason meta)")
    normal = steps_per_second(diagnostics, 5)
    rss_before = rss_mib(trainer.pid)
    chars = "".join(chr(c) for c in range(0x10FFFF) if not 0xD800 <= c < 0xE000)[:1_000_000]
    large = StreamMeta.build(CharTokenizer(chars), corruption=stream.meta.corruption, token_counts=np.full(len(chars), 1 << 40),
                             block_size=32, rows_per_message=8, packing="lines", sampling="random", seed=0,
                             corpus_fingerprint="f" * 16, val_messages=1)
    frames = [encode_meta(dataclasses.replace(large, seed=seed), f"flood-{seed}", 0, incarnation=INCARNATION)
              for seed in range(LARGE_METAS)]
    started = diagnostics.get()["step"]
    clock = time.monotonic()
    for message in frames:
        attacker.send_multipart(message)

    def all_rejected(snapshot) -> bool:  # parsed and foreign (meta_mismatch), or turned away unparsed (meta)
        rejected = snapshot["stream"]["rejected"]
        return rejected.get("meta_mismatch", 0) + rejected.get("meta", 0) - 1 >= LARGE_METAS

    final = diagnostics.wait_for(all_rejected, "the large metas rejected", timeout=300)
    time.sleep(max(0.0, 10 - (time.monotonic() - clock)))
    during = (diagnostics.get()["step"] - started) / (time.monotonic() - clock)  # the 10 s from the first one
    grown = rss_mib(trainer.pid) - rss_before
    after = steps_per_second(diagnostics, 5)
    parsed = final["stream"]["rejected"].get("meta_mismatch", 0)
    print(f"attack metas: forged hf meta rejected (meta); {LARGE_METAS} metas of {len(frames[0][1]) / 1e6:.1f} MB "
          f"({parsed} parsed, the rest turned away unparsed): RSS +{grown:.0f} MiB, {normal:.0f} steps/s before, "
          f"{during:.0f} over the 10 s from the first, {after:.0f} after")
    assert trainer.alive()
    # What ZeroMQ may hold for one peer (RECEIVE_HWM whole messages) and one meta being parsed: it
    # holds more of them when the trainer drains its socket slower (a loaded host: +208 MiB once),
    # never the 40 x 12 MB sent (before: +2.9 GiB).
    meta_mib = len(frames[0][1]) / 2**20
    assert grown < (RECEIVE_HWM + 2) * meta_mib + 32, (grown, meta_mib)
    assert during > normal / 2 and after > normal / 2
    code = trainer.stop()
    assert code == 143, trainer.output(80)
