"""ZeroMQ endpoints as the flags take them: ``tcp://HOST:PORT`` (or another ZeroMQ transport).

ZeroMQ refuses an endpoint without its transport (``127.0.0.1:5555``) or a tcp endpoint
without a port with a bare ``Invalid argument``. :func:`check_endpoints` is a ``check`` for
:func:`shared.settings.setting` fields that hold endpoints (``--connect``, ``--bind``): a usage
error that names the value and what it should look like, before any socket is made.
:func:`free_port` picks a port for a process about to bind one.
"""

from __future__ import annotations

import re
import socket

TRANSPORTS = ("tcp", "ipc", "inproc", "pgm", "epgm", "vmci")
_TCP = re.compile(r"tcp://.+:(?:\d+|\*)")  # HOST:PORT; ZeroMQ itself checks the host


def check_endpoint(endpoint: str) -> None:
    """ValueError, with a hint, for ``endpoint`` that ZeroMQ would refuse for want of a transport or
    a port (``127.0.0.1:5555`` -> did you mean tcp://127.0.0.1:5555?)."""
    transport, separator, _ = endpoint.partition("://")
    if not separator:
        raise ValueError(f"endpoint {endpoint!r} names no transport: did you mean tcp://{endpoint}? "
                         f"(endpoints look like tcp://HOST:PORT)")
    if transport not in TRANSPORTS:
        raise ValueError(f"endpoint {endpoint!r}: {transport!r} is not a ZeroMQ transport ({', '.join(TRANSPORTS)})")
    if transport == "tcp" and not _TCP.fullmatch(endpoint):
        raise ValueError(f"endpoint {endpoint!r} is not tcp://HOST:PORT (HOST may be * to bind every interface)")


def check_endpoints(value: str | tuple[str, ...]) -> None:
    """:func:`check_endpoint` for every endpoint of ``value``: one endpoint, a comma-separated list
    of them (``--bind`` under torchrun), or a tuple of either (a repeatable flag)."""
    for item in (value,) if isinstance(value, str) else value:
        for endpoint in item.split(","):
            if endpoint.strip():
                check_endpoint(endpoint.strip())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` this instant (the kernel's pick for port 0): for launchers,
    benchmarks and tests that start a process which binds it."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
