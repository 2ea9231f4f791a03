"""Diagnostics + HTTP app: every key with sane values after a real (tiny) training run, the
cumulative percentiles, answers while the training thread is blocked, Prometheus text, CLI."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.batch_stats import MaskRatioHistogram
from trainer.diagnostics.alarms import AlarmSettings
from trainer.diagnostics.config import DiagnosticsSettings
from trainer.diagnostics.http import create_app, serve_in_thread, start_diagnostics
from trainer.diagnostics.state import Diagnostics
from trainer.loop.numbers import EvalNumbers, StepNumbers

from helpers.processes import free_port
from helpers.streams import FakeConsumer, make_trainer

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 30-step run with diagnostics and the app served on a free port."""
    consumer = FakeConsumer()
    diagnostics = Diagnostics(consumer, probe_interval=20, no_context_positions=64, alarm_settings=AlarmSettings(warmup_steps=10))
    trainer = make_trainer(tmp_path_factory.mktemp("run"), consumer, diagnostics)
    trainer.run()
    server = serve_in_thread(create_app(diagnostics), "127.0.0.1", 0)
    yield consumer, diagnostics, f"http://127.0.0.1:{server.port}"
    server.stop()


def test_every_key_is_present_with_sane_values(finished_run):
    consumer, _, url = finished_run
    body = httpx.get(f"{url}/diagnostics", timeout=TIMEOUT).json()
    assert body["status"] == "finished" and body["step"] == 30
    assert body["meta"]["vocab_size"] == consumer.meta.vocab_size and "token_counts" not in body["meta"]
    assert body["meta"]["content_tokens"] == int(consumer.meta.counts.sum())
    loss = body["loss"]
    assert 0 < loss["train"] < 6 and 0 < loss["val"] < 6 and loss["train_step"] == 30 and loss["val_step"] == 30
    assert loss["train_by_stage"] == {} and loss["val_by_stage"] == {}  # this stream has no stages
    assert 0 < loss["context_free_floor"] < math.log(consumer.meta.base_size)
    batch = body["batch"]
    assert batch["rows"] == 8 and 1 <= batch["valid_len"]["min"] <= batch["valid_len"]["p50"] <= batch["valid_len"]["max"] <= 48
    assert 0 < batch["supervised_per_position"] <= batch["supervised_per_token"] <= 1
    assert sum(batch["corruption"].values()) == pytest.approx(100.0)
    assert 0 <= batch["mask_ratio"]["p10"] <= batch["mask_ratio"]["p50"] <= batch["mask_ratio"]["p90"] <= 1
    assert body["cumulative"]["mask_ratio"]["count"] == 30 * 8
    probe = body["attention_probe"]
    assert probe["step"] == 20  # probes at evals 0 and 20 (interval 20); eval 30 is only 10 later
    assert probe["loss_noattn_minus_attn"] == pytest.approx(probe["loss_noattn"] - probe["loss_attn"])
    assert probe["positions"] > 0 and probe["no_context_positions"] == 64
    stream = body["stream"]
    assert stream["consumed_batches"] == 30 and stream["producers"]["p0"]["gaps"] == 1
    assert 0 <= stream["data_wait_fraction"] <= 1
    throughput = body["throughput"]
    assert throughput["ms_per_step"] > 0 and throughput["tokens_per_s"] > 0
    assert {alarm["name"] for alarm in body["alarms"]} == {"context_blind", "starved", "data_bound", "rejecting",
                                                                "meta_mismatch", "head_of_line", "source_exhausted"}
    assert not any(alarm["active"] for alarm in body["alarms"] if alarm["name"] != "context_blind")
    assert httpx.get(f"{url}/healthz", timeout=TIMEOUT).json() == {"ok": True, "step": 30}


def test_cumulative_percentiles_equal_a_direct_computation_over_every_row(finished_run):
    consumer, diagnostics, _ = finished_run
    ratios = np.concatenate(consumer.ratios_seen)
    direct = MaskRatioHistogram()
    direct.add(ratios)
    reported = diagnostics.snapshot().cumulative.mask_ratio
    assert [reported.p10, reported.p50, reported.p90] == direct.percentiles([10, 50, 90])
    assert [reported.p10, reported.p50, reported.p90] == pytest.approx(np.percentile(ratios, [10, 50, 90]), abs=0.02)


def test_history_has_a_point_per_log_step_and_per_eval(finished_run):
    _, _, url = finished_run
    history = httpx.get(f"{url}/history", timeout=TIMEOUT).json()
    assert history["train"]["step"] == [5, 10, 15, 20, 25, 30]
    assert all(len(column) == 6 for column in history["train"].values())
    assert {"loss", "batch_p50", "cumulative_p90", "data_wait_fraction", "ms_per_step"} <= set(history["train"])
    assert history["eval"]["step"] == [0, 10, 20, 30]
    assert history["eval"]["loss_no_context"][0] is not None and history["eval"]["loss_no_context"][1] is None
    assert history["context_free_floor"] > 0


def test_metrics_parse_as_prometheus_text(finished_run):
    _, _, url = finished_run
    response = httpx.get(f"{url}/metrics", timeout=TIMEOUT)
    samples = {}
    families = [family.name for family in text_string_to_metric_families(response.text)]
    assert len(families) == len(set(families)), "a metric family is emitted twice"
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("linepack_step", ())] == 30
    assert ("linepack_loss_nats", (("split", "val"),)) in samples
    assert ("linepack_context_free_floor_nats", (("split", "train"),)) in samples
    assert samples[("linepack_stream_rejected_total", (("reason", "meta_mismatch"),))] == 0
    assert samples[("linepack_stream_messages_total", (("kind", "consumed"),))] == 30
    assert samples[("linepack_stream_sequence_errors_total", (("kind", "gaps"),))] == 1
    assert samples[("linepack_stream_producer_total", (("kind", "gaps"), ("producer", "p0")))] == 1
    assert samples[("linepack_alarm_active", (("alarm", "starved"),))] == 0
    assert ("linepack_attention_probe_loss_nats", (("mask", "no_context"),)) in samples
    assert ("linepack_mask_ratio", (("percentile", "50"), ("window", "cumulative"))) in samples
    assert ("linepack_mask_ratio", (("percentile", "90"), ("window", "batch"))) in samples


def test_openapi_documents_the_typed_response(finished_run):
    _, _, url = finished_run
    schema = httpx.get(f"{url}/openapi.json", timeout=TIMEOUT).json()
    response = schema["components"]["schemas"]["DiagnosticsResponse"]["properties"]
    assert {"step", "meta", "loss", "batch", "cumulative", "attention_probe", "stream", "alarms", "throughput"} <= set(response)
    assert {"train", "val", "context_free_floor"} <= set(schema["components"]["schemas"]["LossNumbers"]["properties"])


def test_the_endpoint_answers_while_the_training_thread_is_blocked(tmp_path):
    consumer = FakeConsumer()
    diagnostics = Diagnostics(consumer, probe_interval=0, alarm_settings=AlarmSettings(starved_seconds=0.3))
    trainer = make_trainer(tmp_path, consumer, diagnostics, max_iters=12)
    server = serve_in_thread(create_app(diagnostics), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}"
    original_next = consumer.next_batch

    def next_batch_closing_the_gate_at_step_5(split="train", timeout=None):
        if consumer.consumed == 5:
            consumer.gate.clear()
        return original_next(split, timeout)

    consumer.next_batch = next_batch_closing_the_gate_at_step_5
    thread = threading.Thread(target=trainer.run, daemon=True)
    try:
        thread.start()
        assert consumer.blocked.wait(TIMEOUT)
        time.sleep(0.4)
        started = time.monotonic()
        body = httpx.get(f"{url}/diagnostics", timeout=TIMEOUT).json()
        assert time.monotonic() - started < 2.0
        assert body["status"] == "training" and body["step"] == 5
        starved = next(alarm for alarm in body["alarms"] if alarm["name"] == "starved")
        assert starved["active"] and starved["since_step"] == 5
    finally:
        consumer.gate.set()
        thread.join(TIMEOUT)
        server.stop()
    assert not thread.is_alive()
    assert diagnostics.snapshot().step == 12


def test_per_stage_losses_reach_the_diagnostics():
    diagnostics = Diagnostics(FakeConsumer())
    diagnostics.on_step(StepNumbers(step=5, log=True, lr=1e-3, step_ms=1.0, data_wait_ms=0.0, tokens=8, train_loss=2.5,
                                    train_loss_by_stage={"0": 2.0, "1": 3.0}))
    diagnostics.on_eval(EvalNumbers(step=5, val_loss=2.6, val_loss_by_stage={"0": 2.1, "1": 3.1}, val_supervised=10,
                                    eval_ms=1.0, before_training=False))
    loss = diagnostics.snapshot().loss
    assert loss.train_by_stage == {"0": 2.0, "1": 3.0} and loss.val_by_stage == {"0": 2.1, "1": 3.1}


def test_rejections_raise_rejecting_and_meta_mismatch():
    consumer = FakeConsumer()
    diagnostics = Diagnostics(consumer)
    for _ in range(10):
        consumer.next_batch()
    assert not any(alarm.active for alarm in diagnostics.snapshot().alarms)
    consumer.rejected["meta_mismatch"] = 3
    alarms = {alarm.name: alarm for alarm in diagnostics.snapshot().alarms}
    assert alarms["meta_mismatch"].active and alarms["rejecting"].active
    assert "meta_mismatch: 3" in alarms["rejecting"].explanation


def test_cli_arguments_and_port_zero_disables_the_server():
    defaults = DiagnosticsSettings()
    assert (defaults.http_host, defaults.http_port, defaults.probe_interval) == ("127.0.0.1", 8000, None)
    diagnostics, server = start_diagnostics(DiagnosticsSettings(http_port=0, probe_interval=50))
    assert server is None and diagnostics.prober.interval == 50
    port = free_port()  # released: free for the server
    diagnostics, server = start_diagnostics(DiagnosticsSettings(http_port=port))
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT).json() == {"ok": True, "step": 0}
        body = httpx.get(f"http://127.0.0.1:{port}/diagnostics", timeout=TIMEOUT).json()
        assert body["status"] == "starting" and body["meta"] is None and body["stream"] is None
    finally:
        server.stop()
    assert not server.thread.is_alive()


def test_a_taken_port_leaves_training_without_the_server(caplog):
    with taken_port() as port:
        diagnostics, server = start_diagnostics(DiagnosticsSettings(http_port=port))
    assert server is None and isinstance(diagnostics, Diagnostics)
    assert "training goes on without it" in caplog.text


@contextlib.contextmanager
def taken_port():
    """A TCP port on 127.0.0.1 that a listening socket holds until exit."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_snapshot_types_the_real_consumer_and_counts_a_foreign_stream():
    """Real DatasetConsumer, real producer messages over ZeroMQ on 127.0.0.1, then a message
    from a stream with another block size: meta_mismatch and rejecting fire."""
    zmq = pytest.importorskip("zmq")
    stream_module = pytest.importorskip("producer.stream")
    config_module = pytest.importorskip("shared.data_config")
    from shared.wire import encode, encode_meta
    from trainer.data.consumer import DatasetConsumer

    from helpers.producers import OrderServer, dealer

    text = "".join(f"line {i} of a small corpus\n" for i in range(200))
    corpus = pytest.importorskip("producer.corpus").Corpus(text=text, name="test", fingerprint="0" * 16)
    stream = stream_module.BatchStream(config_module.DataConfig(block_size=32, rows_per_message=8), corpus)
    foreign = stream_module.BatchStream(config_module.DataConfig(block_size=48, rows_per_message=8), corpus)
    context = zmq.Context()
    val = stream.val_set()
    serve = lambda split, index: stream.train_message(index) if split == "train" else val[index]  # noqa: E731
    with DatasetConsumer("tcp://127.0.0.1:*", batch_size=8) as consumer:
        diagnostics = Diagnostics(consumer)
        assert diagnostics.snapshot().meta is None
        with OrderServer(consumer.endpoint, stream.meta, serve, producer_id="p0"):
            assert consumer.wait_for_val_set(TIMEOUT)
            ratios = [consumer.next_batch(timeout=TIMEOUT)["mask_ratio"].numpy() for _ in range(3)]
            snapshot = diagnostics.snapshot()
        assert snapshot.meta.block_size == 32 and snapshot.loss.context_free_floor > 0  # pinned before on_start
        assert snapshot.stream.producers["p0"].messages >= len(val) + 3
        assert snapshot.stream.train_k == 3 and snapshot.stream.orders_delivered >= len(val) + 3
        assert snapshot.batch.rows == 8
        direct = MaskRatioHistogram()
        direct.add(np.concatenate(ratios))
        assert snapshot.cumulative.mask_ratio.p50 == direct.percentiles([50])[0]
        assert not any(alarm.active for alarm in snapshot.alarms)

        push = dealer(context, consumer.endpoint)
        try:
            push.send_multipart(encode_meta(foreign.meta, "p1", 0))
            # "rejecting" is a share of the window's messages, and the real producer's count
            # depends on how far the consumer ordered ahead (up to 64 more under load): send
            # foreign messages until the share is over the threshold, a bounded number of them.
            batch = next(foreign.train_batches())
            for seq in range(1, 41):
                push.send_multipart(encode(foreign.meta, "train", "p1", seq, batch, seq - 1), copy=False)
                deadline = time.monotonic() + TIMEOUT
                while consumer.stats().to_dict()["rejected_total"] < seq and time.monotonic() < deadline:
                    time.sleep(0.02)
                alarms = {alarm.name: alarm for alarm in diagnostics.snapshot().alarms}
                if alarms["rejecting"].active:
                    break
            assert alarms["meta_mismatch"].active and alarms["rejecting"].active, alarms["rejecting"].explanation
        finally:
            push.close(linger=0)
            context.term()


@contextlib.contextmanager
def running_server(**settings):
    port = free_port()
    diagnostics, server = start_diagnostics(DiagnosticsSettings(http_port=port, **settings))
    try:
        yield port
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/", "/diagnostics", "/metrics", "/healthz", "/history"])
def test_head_is_answered_like_get_without_a_body(path):
    with running_server() as port:
        head = httpx.head(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT)
        get = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT)
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def closed_by_peer(sock: socket.socket, wait_s: float = 0.5) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_cannot_use_up_the_server(monkeypatch):
    """Four times the connection cap held open and idle: a real request still gets its answer,
    and the server never holds more than the cap."""
    from trainer.diagnostics import server as server_module

    with running_server() as port:
        idle = []
        try:
            for _ in range(4 * server_module.MAX_CONNECTIONS):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT).status_code == 200
            closed = sum(closed_by_peer(sock) for sock in idle)
            assert closed >= 3 * server_module.MAX_CONNECTIONS - 1, "the oldest idle connections were closed"
        finally:
            for sock in idle:
                sock.close()


def test_a_request_that_never_finishes_is_cut_off(monkeypatch):
    from trainer.diagnostics import server as server_module

    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT_S", 0.5)
    with running_server() as port, socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as slow:
        slow.sendall(b"GET /diagnostics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        assert closed_by_peer(slow, wait_s=5) and time.monotonic() - started < 3
