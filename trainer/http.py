"""The read-only diagnostics HTTP app (FastAPI), served from a daemon thread (SPEC §6).

Routes: ``GET /`` (the live page, ``trainer/static/index.html``), ``GET /diagnostics``
(:class:`~trainer.diagnostics.DiagnosticsResponse`, typed in ``/docs``), ``GET /history``
(column series for the page's charts), ``GET /metrics`` (Prometheus text from a private
registry) and ``GET /healthz``. Nothing here writes to the trainer; nothing secret is served.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainer.alarms import AlarmSettings
from trainer.diagnostics import Diagnostics, DiagnosticsResponse, StreamNumbers

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
log = logging.getLogger("trainer")


class DiagnosticsCollector:
    """Prometheus collector: every scrape reads one fresh snapshot."""

    def __init__(self, diagnostics: Diagnostics) -> None:
        self.diagnostics = diagnostics

    def collect(self) -> Iterator[Any]:
        snap = self.diagnostics.snapshot()
        yield _gauge("linepack_step", "training step", snap.step)
        loss = GaugeMetricFamily("linepack_loss_nats", "cross-entropy over supervised positions", labels=["split"])
        floor = GaugeMetricFamily("linepack_context_free_floor_nats", "lowest loss without context", labels=["split"])
        for split, value, floor_value in (
            ("train", snap.loss.train, snap.loss.context_free_floor),
            ("val", snap.loss.val, snap.loss.context_free_floor_val),
        ):
            if value is not None:
                loss.add_metric([split], value)
            if floor_value is not None:
                floor.add_metric([split], floor_value)
        yield loss
        yield floor
        if snap.attention_probe is not None:
            probe = GaugeMetricFamily("linepack_attention_probe_loss_nats", "attention probe losses", labels=["mask"])
            for mask, value in (("real", snap.attention_probe.loss_attn), ("none", snap.attention_probe.loss_noattn),
                                ("no_context", snap.attention_probe.loss_no_context)):
                probe.add_metric([mask], value)
            yield probe
        for name, value in snap.throughput.model_dump().items():
            if value is not None:
                yield _gauge(f"linepack_{name}", name.replace("_", " "), value)
        ratio = GaugeMetricFamily("linepack_mask_ratio", "supervised / candidates per row, percentiles", labels=["window", "quantile"])
        for window, numbers in (("batch", snap.batch.mask_ratio if snap.batch else None), ("cumulative", snap.cumulative.mask_ratio)):
            for quantile, key in (("0.1", "p10"), ("0.5", "p50"), ("0.9", "p90")):
                if numbers is not None and getattr(numbers, key) is not None:
                    ratio.add_metric([window, quantile], getattr(numbers, key))
        yield ratio
        yield from _stream_metrics(snap.stream)
        alarm = GaugeMetricFamily("linepack_alarm_active", "1 while the alarm is raised", labels=["alarm"])
        for state in snap.alarms:
            alarm.add_metric([state.name], float(state.active))
        yield alarm


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _stream_metrics(stream: StreamNumbers | None) -> Iterator[Any]:
    """Counters of ``DatasetConsumer.stats()``: totals, rejections by reason, per producer."""
    if stream is None:
        return
    messages = CounterMetricFamily("linepack_stream_messages", "messages received / accepted / rejected / consumed / dropped", labels=["kind"])
    for kind, key in (("received", "received"), ("accepted", "accepted"), ("rejected", "rejected_total"),
                      ("consumed", "consumed_messages"), ("dropped_train", "dropped_train")):
        messages.add_metric([kind], getattr(stream, key))
    yield messages
    sequence = CounterMetricFamily("linepack_stream_sequence_errors", "per-producer sequence accounting, summed", labels=["kind"])
    for kind in ("gaps", "duplicates", "out_of_order"):
        sequence.add_metric([kind], getattr(stream, kind))
    yield sequence
    yield CounterMetricFamily("linepack_stream_consumed_batches", "batches handed to the training loop", value=stream.consumed_batches)
    reasons = CounterMetricFamily("linepack_stream_rejected", "rejected messages by reason", labels=["reason"])
    for reason, count in sorted(stream.rejected.items()):
        reasons.add_metric([reason], count)
    yield reasons
    producers = CounterMetricFamily("linepack_stream_producer", "per-producer message accounting", labels=["producer", "kind"])
    for producer, row in sorted(stream.producers.items()):
        for kind in ("messages", "gaps", "duplicates", "out_of_order"):
            producers.add_metric([producer, kind], getattr(row, kind))
    yield producers
    yield _gauge("linepack_stream_queue_depth", "assembled batches waiting for the training loop", stream.queue_depth)
    yield _gauge("linepack_stream_starved", "1 while the consumer waits for producers", float(stream.starved))
    if stream.seconds_since_last_message is not None:
        yield _gauge("linepack_stream_seconds_since_last_message", "seconds since the last message", stream.seconds_since_last_message)


def create_app(diagnostics: Diagnostics) -> FastAPI:
    """The read-only app over ``diagnostics``."""
    app = FastAPI(title="Linepack trainer diagnostics", description=__doc__)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DiagnosticsCollector(diagnostics))
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


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """``--http-host``, ``--http-port`` (0 disables), ``--probe-interval``, ``--alarm-warmup-steps``."""
    group = parser.add_argument_group("diagnostics")
    group.add_argument("--http-host", default="127.0.0.1", help="diagnostics bind address (default: 127.0.0.1)")
    group.add_argument("--http-port", type=int, default=8000, help="diagnostics port; 0 disables the server (default: 8000)")
    group.add_argument("--probe-interval", type=int, default=None,
                       help="steps between attention probes, run at evals (default: every eval; 0 disables)")
    group.add_argument("--alarm-warmup-steps", type=int, default=AlarmSettings.warmup_steps,
                       help=f"steps before context_blind may fire (default: {AlarmSettings.warmup_steps})")


def start_diagnostics(
    args: argparse.Namespace, consumer: Any = None, stream_stats: Callable[[], dict[str, Any]] | None = None,
) -> tuple[Diagnostics, ServerHandle | None]:
    """A :class:`Diagnostics` over ``consumer`` to register as a trainer observer, and its
    server (None when ``--http-port 0``). Start it before ``Trainer.prepare`` so the stream
    numbers and the ``starved`` alarm show while the trainer waits for producers.
    ``stream_stats`` replaces ``consumer.stats()`` (data-parallel rank 0: every rank's)."""
    settings = AlarmSettings(warmup_steps=args.alarm_warmup_steps)
    diagnostics = Diagnostics(consumer, probe_interval=args.probe_interval, alarm_settings=settings, stream_stats=stream_stats)
    if args.http_port == 0:
        return diagnostics, None
    try:
        server = serve_in_thread(create_app(diagnostics), args.http_host, args.http_port)
    except (OSError, RuntimeError) as error:  # e.g. the port is taken: diagnostics are not worth a lost run
        log.warning("diagnostics server on %s:%d: %s; training goes on without it (--http-port picks another)",
                    args.http_host, args.http_port, error)
        return diagnostics, None
    log.info("diagnostics on http://%s:%d/ (JSON: /diagnostics, Prometheus: /metrics)", args.http_host, server.port)
    return diagnostics, server


@contextlib.contextmanager
def serve_diagnostics(
    args: argparse.Namespace, consumer: Any = None, stream_stats: Callable[[], dict[str, Any]] | None = None,
) -> Iterator[Diagnostics]:
    """:func:`start_diagnostics` as a context manager: the server stops on exit."""
    diagnostics, server = start_diagnostics(args, consumer, stream_stats)
    try:
        yield diagnostics
    finally:
        if server is not None:
            server.stop()
