"""shared.endpoints: an endpoint ZeroMQ would refuse with a bare "Invalid argument" is a usage error with a hint."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from shared.endpoints import check_endpoint, check_endpoints, free_port

from helpers import ROOT


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://*:5555", "tcp://trainer:5555", "tcp://[::1]:5555",
                                      "tcp://0.0.0.0:*", "ipc:///tmp/linepack.sock", "inproc://stream"])
def test_endpoints_zeromq_takes_pass(endpoint):
    check_endpoint(endpoint)


@pytest.mark.parametrize(("endpoint", "message"), [
    ("127.0.0.1:5555", "names no transport: did you mean tcp://127.0.0.1:5555?"),
    ("http://127.0.0.1:5555", "'http' is not a ZeroMQ transport"),
    ("tcp://127.0.0.1", "is not tcp://HOST:PORT"),
    ("tcp://:5555", "is not tcp://HOST:PORT"),
])
def test_endpoints_zeromq_refuses_are_explained(endpoint, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace(".", r"\.")):
        check_endpoint(endpoint)


def test_lists_and_repeated_flags_are_checked_endpoint_by_endpoint():
    check_endpoints(("tcp://a:5555", "tcp://a:5556,tcp://a:5557"))
    with pytest.raises(ValueError, match="did you mean tcp://b:5556"):
        check_endpoints("tcp://a:5555, b:5556")


def test_a_cli_says_what_an_endpoint_lacks():
    done = subprocess.run([sys.executable, "-m", "trainer.consume", "--connect", "127.0.0.1:5555", "--batches", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "did you mean tcp://127.0.0.1:5555?" in done.stderr, done.stderr


@pytest.mark.parametrize("argv", [["producer", "run", "--connect", "127.0.0.1:5555"], ["producer", "run", "--bind", "*:5555"],
                                  ["trainer", "--bind", "*:5555", "--out-dir", "unused"]])
def test_producer_and_trainer_say_what_an_endpoint_lacks(argv):
    done = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "names no transport: did you mean tcp://" in done.stderr, done.stderr


def test_free_port_names_a_port_that_can_be_bound():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
