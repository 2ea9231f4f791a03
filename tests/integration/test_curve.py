"""CurveZMQ on the producer -> trainer link (shared.curve, issue 9 item 4).

With Curve on, only producers whose public key the trainer lists get a message through:
no Curve at all, an unlisted key, or the wrong server key all fail the handshake, so the
consumer never receives (let alone accepts) one of their messages. With Curve off nothing changes.
"""

from __future__ import annotations

import signal
import stat
import time

import numpy as np
import pytest
import zmq

from shared.curve import CurveClient, CurveKeyError, CurveServer, configure_client, load_authorized_keys, load_public_key, load_secret_pair
from shared.curve import main as curve_main
from shared.recording import RecordingWriter
from trainer.data.consumer import DatasetConsumer

from helpers.processes import TINY_DATA, run_module
from helpers.wire import make_frames, make_meta, meta_frames

HANDSHAKE_GRACE_S = 1.5  # ample for a loopback handshake and a few reconnect attempts


@pytest.fixture
def keys(tmp_path):
    """Key pairs for the trainer and three producers; ``keys/allowed`` lists only ``trusted``."""
    directory = tmp_path / "keys"
    assert curve_main(["keygen", str(directory), "trainer", "trusted", "stranger"]) == 0
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "trusted.key").write_bytes((directory / "trusted.key").read_bytes())
    return directory, allowed


def producer_args(endpoint, producer_id, *flags):
    """``python -m producer run`` arguments of a producer on TINY_DATA rows."""
    return ["producer", "run", "--connect", endpoint, "--producer-id", producer_id, *TINY_DATA, "--status-every", "60", *flags]


def curve_flags(directory, name, server="trainer"):
    return ["--curve-secret-key", str(directory / f"{name}.key_secret"), "--curve-server-key", str(directory / f"{server}.key")]


def test_keygen_writes_private_secret_files_and_refuses_to_overwrite(tmp_path, keys):
    directory, allowed = keys
    for name in ("trainer", "trusted", "stranger"):
        assert stat.S_IMODE((directory / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((directory / f"{name}.key").stat().st_mode) == 0o644
        public, secret = load_secret_pair(directory / f"{name}.key_secret")
        assert len(public) == len(secret) == 40 and public == load_public_key(directory / f"{name}.key")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    before = (directory / "trusted.key_secret").read_bytes()
    with pytest.raises(SystemExit) as refused:
        curve_main(["keygen", str(directory), "trusted"])
    assert refused.value.code == 2 and (directory / "trusted.key_secret").read_bytes() == before
    with pytest.raises(CurveKeyError, match="no Curve secret key"):
        load_secret_pair(directory / "trusted.key")  # a public file where the secret one belongs
    assert load_authorized_keys(allowed) == {load_public_key(directory / "trusted.key")}
    assert len(load_authorized_keys(directory)) == 3
    with pytest.raises(CurveKeyError, match="no \\*.key files"):
        load_authorized_keys(tmp_path)  # a directory holding no key files
    with pytest.raises(CurveKeyError):
        load_public_key(tmp_path / "missing.key")


def test_only_listed_producers_get_a_message_through(keys, children):
    directory, allowed = keys
    server = CurveServer.from_files(directory / "trainer.key_secret", allowed)
    with DatasetConsumer("tcp://127.0.0.1:*", 8, curve=server) as consumer:
        procs = {
            "trusted": children.start(*producer_args(consumer.endpoint, "trusted", *curve_flags(directory, "trusted"))),
            "plain": children.start(*producer_args(consumer.endpoint, "plain")),
            "stranger": children.start(*producer_args(consumer.endpoint, "stranger", *curve_flags(directory, "stranger"))),
            # the listed key, but it trusts another server key: the handshake cannot complete
            "wrong-server": children.start(
                *producer_args(consumer.endpoint, "wrong-server", *curve_flags(directory, "trusted", server="stranger"))),
        }
        try:
            forge_plain_messages(consumer.endpoint)
            batches = [consumer.next_batch(timeout=30) for _ in range(10)]
            time.sleep(HANDSHAKE_GRACE_S)
            stats = consumer.stats().to_dict()
            guard = consumer.curve_guard
        finally:
            for proc in procs.values():
                proc.popen.send_signal(signal.SIGTERM)
            for proc in procs.values():
                proc.wait(10)
    assert set(stats["producers"]) == {"trusted"}
    assert stats["received"] == stats["accepted"] == stats["producers"]["trusted"]["messages"]
    assert stats["rejected_total"] == 0 and stats["gaps"] == 0
    assert guard.accepted >= 1 and guard.refused >= 1  # the stranger's key was seen and refused
    assert all(b["x"].shape == (8, 32) for b in batches)
    for name in ("plain", "stranger", "wrong-server"):
        summary = procs[name].json_line("summary ")
        # It ran and waited: no pipe to the trainer ever opened, so no order ever came.
        assert summary and summary["links"][0]["orders"] == 0 and summary["by_split"].get("train", 0) == 0, procs[name].output()


def forge_plain_messages(endpoint: str) -> int:
    """Three valid-looking messages from a client without Curve; returns how many were queued."""
    rng = np.random.default_rng(3)
    meta = make_meta(block_size=32, rows_per_message=8)
    with zmq.Context() as context:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.SNDHWM, 8)
        socket.connect(endpoint)
        socket.send_multipart(meta_frames(meta, "forger", 0), flags=zmq.NOBLOCK)
        for seq in range(1, 3):
            socket.send_multipart(make_frames(meta, "forger", seq, rng, index=seq - 1), flags=zmq.NOBLOCK)
        socket.close(linger=500)
    return 3


def test_with_curve_off_a_plain_producer_works_and_a_curve_client_gets_nothing_through(keys, children):
    directory, _ = keys
    with DatasetConsumer("tcp://127.0.0.1:*", 8) as consumer:
        assert consumer.curve_guard is None
        with zmq.Context() as context:  # a Curve client cannot talk to a server without Curve
            curve_socket = context.socket(zmq.DEALER)
            configure_client(curve_socket, CurveClient.from_files(directory / "trusted.key_secret", directory / "trainer.key"))
            curve_socket.connect(consumer.endpoint)
            curve_socket.send_multipart(make_frames(make_meta(32, 8), "curve-client", 0, np.random.default_rng(1)),
                                        flags=zmq.NOBLOCK)
            plain = children.start(*producer_args(consumer.endpoint, "plain"))
            try:
                batches = [consumer.next_batch(timeout=30) for _ in range(5)]
                time.sleep(HANDSHAKE_GRACE_S)
                stats = consumer.stats().to_dict()
            finally:
                plain.stop(timeout=10)
                curve_socket.close(linger=0)
    assert set(stats["producers"]) == {"plain"} and stats["rejected_total"] == 0
    assert stats["received"] == stats["producers"]["plain"]["messages"]
    assert len(batches) == 5


def test_replay_takes_the_same_curve_flags(tmp_path, keys, children):
    directory, allowed = keys
    meta, rng = make_meta(block_size=32, rows_per_message=8, val_messages=0), np.random.default_rng(5)
    for name in ("replayed-trusted", "replayed-plain"):
        with RecordingWriter(tmp_path / f"{name}.lprec", {"recorded_by": "test"}) as writer:
            writer.write(meta_frames(meta, name))
            for seq in range(1, 7):
                writer.write(make_frames(meta, name, seq, rng, index=seq - 1))
    server = CurveServer.from_files(directory / "trainer.key_secret", allowed)
    with DatasetConsumer("tcp://127.0.0.1:*", 8, curve=server) as consumer:
        plain = children.start("producer", "replay", tmp_path / "replayed-plain.lprec", "--connect", consumer.endpoint)
        trusted = children.start("producer", "replay", tmp_path / "replayed-trusted.lprec", "--connect", consumer.endpoint,
                                 *curve_flags(directory, "trusted"))
        batches = [consumer.next_batch(timeout=30) for _ in range(6)]
        assert trusted.wait(30) == 0  # asked for train message 6, which its file does not hold
        time.sleep(HANDSHAKE_GRACE_S)
        stats = consumer.stats().to_dict()
        plain_status = plain.stop(timeout=10)  # its connection never opens: it blocks once its queue is full
    assert plain_status == 0 and "summary " in plain.text()
    assert set(stats["producers"]) == {f"replay-{meta.digest}"}  # the authorized replay only
    assert stats["producers"][f"replay-{meta.digest}"]["train"] == 6 and stats["rejected_total"] == 0
    assert len(batches) == 6


def test_producer_flags_go_together(keys):
    directory, _ = keys
    result = run_module(*producer_args("tcp://127.0.0.1:9", "p", "--curve-secret-key", str(directory / "trusted.key_secret")))
    assert result.returncode == 2 and "--curve-secret-key and --curve-server-key go together" in result.stderr
    result = run_module(*producer_args("tcp://127.0.0.1:9", "p", *curve_flags(directory, "trusted", server="nowhere")))
    assert result.returncode == 2 and "cannot read Curve key file" in result.stderr


def test_trainer_flags_go_together(keys, capsys):
    from trainer.__main__ import main as trainer_main

    directory, allowed = keys
    with pytest.raises(SystemExit) as error:
        trainer_main(["--out-dir", "unused", "--curve-secret-key", str(directory / "trainer.key_secret")])
    assert error.value.code == 2
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        trainer_main(["--out-dir", "unused", "--curve-secret-key", str(directory / "trainer.key"),
                      "--curve-authorized-keys", str(allowed)])
    assert error.value.code == 2


@pytest.mark.slow
def test_trainer_cli_trains_only_on_the_listed_producer(tmp_path, keys, cluster):
    directory, allowed = keys
    trainer, _ = cluster.trainer(tmp_path / "run", "--max-iters", "12", "--curve-secret-key",
                                 str(directory / "trainer.key_secret"), "--curve-authorized-keys", str(allowed))
    cluster.producer("plain")
    cluster.producer("stranger", *curve_flags(directory, "stranger"))
    cluster.producer("trusted", *curve_flags(directory, "trusted"))
    assert trainer.wait(90) == 0, cluster.outputs()
    summary = trainer.json_line("done: ")
    trainer.wait_for_line("refused a Curve client with unlisted public key", 1)
    stream = summary["stream"]
    assert summary["steps"] == 12
    assert set(stream["producers"]) == {"trusted"} and stream["rejected_total"] == 0
    assert stream["received"] == stream["producers"]["trusted"]["messages"]
