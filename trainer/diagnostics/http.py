"""The read-only diagnostics HTTP app (FastAPI), served from a daemon thread (docs/SPEC.md §6).

Routes: ``GET /`` (the live page, ``trainer/diagnostics/static/index.html``), ``GET /diagnostics``
(:class:`~trainer.diagnostics.schema.DiagnosticsResponse`, typed in ``/docs``), ``GET /history``
(column series for the page's charts), ``GET /metrics`` (Prometheus text from a private
registry) and ``GET /healthz``. Nothing here writes to the trainer; nothing secret is served.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trainer.data.source import BatchSource
from trainer.data.stats import StreamStats
from trainer.diagnostics.alarms import AlarmSettings
from trainer.diagnostics.config import DiagnosticsSettings
from trainer.diagnostics.prometheus import registry_for
from trainer.diagnostics.schema import DiagnosticsResponse
from trainer.diagnostics.state import Diagnostics

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
log = logging.getLogger("trainer")


def create_app(diagnostics: Diagnostics) -> FastAPI:
    """The read-only app over ``diagnostics``."""
    app = FastAPI(title="Linepack trainer diagnostics", description=__doc__)
    registry = registry_for(diagnostics)
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/diagnostics", response_model=DiagnosticsResponse)
    def get_diagnostics() -> DiagnosticsResponse:
        return diagnostics.snapshot()

    @app.get("/history")
    def get_history() -> dict[str, Any]:
        return diagnostics.history()

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "step": diagnostics.snapshot().step}

    return app


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
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
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


def start_diagnostics(
    options: DiagnosticsSettings, consumer: BatchSource | None = None, stream_stats: Callable[[], StreamStats] | None = None,
) -> tuple[Diagnostics, ServerHandle | None]:
    """A :class:`Diagnostics` over ``consumer`` to register as a trainer observer, and its
    server (None when ``http_port`` is 0). Start it before ``Trainer.prepare`` so the stream
    numbers and the ``starved`` alarm show while the trainer waits for producers.
    ``stream_stats`` replaces ``consumer.stats()`` (data-parallel rank 0: every rank's)."""
    settings = AlarmSettings(warmup_steps=options.alarm_warmup_steps)
    diagnostics = Diagnostics(consumer, probe_interval=options.probe_interval, alarm_settings=settings, stream_stats=stream_stats)
    if options.http_port == 0:
        return diagnostics, None
    try:
        server = serve_in_thread(create_app(diagnostics), options.http_host, options.http_port)
    except (OSError, RuntimeError) as error:  # e.g. the port is taken: diagnostics are not worth a lost run
        log.warning("diagnostics server on %s:%d: %s; training goes on without it (--http-port picks another)",
                    options.http_host, options.http_port, error)
        return diagnostics, None
    log.info("diagnostics on http://%s:%d/ (JSON: /diagnostics, Prometheus: /metrics)", options.http_host, server.port)
    return diagnostics, server


@contextlib.contextmanager
def serve_diagnostics(
    options: DiagnosticsSettings, consumer: BatchSource | None = None, stream_stats: Callable[[], StreamStats] | None = None,
) -> Iterator[Diagnostics]:
    """:func:`start_diagnostics` as a context manager: the server stops on exit."""
    diagnostics, server = start_diagnostics(options, consumer, stream_stats)
    try:
        yield diagnostics
    finally:
        if server is not None:
            server.stop()
