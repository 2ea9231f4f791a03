"""The read-only diagnostics HTTP app (FastAPI), served from a daemon thread (docs/SPEC.md §6).

Routes: ``GET /`` (the live page, ``trainer/diagnostics/static/index.html``), ``GET /diagnostics``
(:class:`~trainer.diagnostics.schema.DiagnosticsResponse`, typed in ``/docs``), ``GET /history``
(column series for the page's charts), ``GET /metrics`` (Prometheus text from a private
registry) and ``GET /healthz``. Nothing here writes to the trainer; nothing secret is served.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trainer.data.source import BatchSource
from trainer.data.stats import StreamStats
from trainer.diagnostics.alarms import AlarmSettings
from trainer.diagnostics.config import DiagnosticsSettings
from trainer.diagnostics.prometheus import registry_for
from trainer.diagnostics.schema import DiagnosticsResponse
from trainer.diagnostics.server import ServerHandle, serve_in_thread
from trainer.diagnostics.state import Diagnostics

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
log = logging.getLogger("trainer")


def create_app(diagnostics: Diagnostics) -> FastAPI:
    """The read-only app over ``diagnostics``: every route answers GET, and HEAD as GET without a
    body (only the GET routes are in the OpenAPI schema)."""
    app = FastAPI(title="Linepack trainer diagnostics", description=__doc__)
    registry = registry_for(diagnostics)
    page = PAGE.read_text(encoding="utf-8")

    @app.head("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.head("/diagnostics", response_model=DiagnosticsResponse, include_in_schema=False)
    @app.get("/diagnostics", response_model=DiagnosticsResponse)
    def get_diagnostics() -> DiagnosticsResponse:
        return diagnostics.snapshot()

    @app.head("/history", include_in_schema=False)
    @app.get("/history")
    def get_history() -> dict[str, Any]:
        return diagnostics.history()

    @app.head("/metrics", response_class=Response, include_in_schema=False)
    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.head("/healthz", include_in_schema=False)
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "step": diagnostics.snapshot().step}

    return app


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
