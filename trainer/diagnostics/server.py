"""The diagnostics HTTP server: uvicorn in a daemon thread, guarded against idle and unfinished connections.

A read-only dashboard must never cost the trainer its file descriptors (docs/SECURITY.md): the
server holds at most :data:`MAX_CONNECTIONS` connections (when full, a new connection closes the
oldest idle one, so a flood of idle connections cannot keep a real request out), and a
connection that has not finished its request within :data:`REQUEST_TIMEOUT_S` of arriving (or of
its previous response) is closed. HEAD is answered like GET, without a body (h11 sends none).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline for every request."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._arrived = time.monotonic()
        if len(self.connections) >= MAX_CONNECTIONS:
            idle = [c for c in self.connections if isinstance(c, GuardedH11) and (c.cycle is None or c.cycle.response_complete)]
            if not idle:
                self._refused = True
                transport.abort()
                return
            min(idle, key=lambda c: c._arrived).transport.abort()
        self._refused = False
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(REQUEST_TIMEOUT_S, self._too_slow)

    def _too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.abort()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


class ServerHandle:
    """A uvicorn server running in a daemon thread on a socket bound here; :meth:`stop` shuts it down."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket) -> None:
        self.server = server
        self.thread = thread
        self.socket = sock

    @property
    def port(self) -> int:
        """The bound port (useful when started with port 0)."""
        return self.socket.getsockname()[1]

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, timeout: float = 10.0) -> ServerHandle:
    """Start ``app`` on ``host:port`` (0 = any free port) in a daemon thread; returns once it listens.

    The socket is bound in the calling thread, so a taken port raises ``OSError`` here."""
    family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http=GuardedH11,
                            timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # the trainer owns the signals
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="diagnostics-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the diagnostics server did not start on {host}:{port}")
        time.sleep(0.02)
    return ServerHandle(server, thread, sock)
