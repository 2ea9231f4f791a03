"""``GET /metrics``: the diagnostics snapshot as Prometheus metrics, from a private registry.

Every scrape reads one fresh snapshot. Stream counters and gauges come from the metadata of
:class:`trainer.data.stats.StreamStats` (each numeric field says whether it is a counter or a
gauge and what it means), so a new stream count is exported without a change here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainer.data.stats import StreamStats, merged_fields
from trainer.diagnostics.schema import DiagnosticsResponse
from trainer.diagnostics.state import Diagnostics

# Throughput field -> (metric name in base units, scale to them, help): Prometheus names carry
# base units (seconds) and no abbreviations.
THROUGHPUT_METRICS = {
    "ms_per_step": ("linepack_step_duration_seconds", 1e-3, "wall time per optimizer step over the last log interval"),
    "tokens_per_s": ("linepack_tokens_per_second", 1.0, "token positions (B*T, every rank) trained per second"),
    "data_wait_fraction": ("linepack_data_wait_ratio", 1.0, "share of step time spent waiting for data"),
}
FAMILY_HELP = {
    "messages": "messages received / accepted / rejected / awaiting_meta / consumed",
    "orders": "the schedule's orders: issued / delivered / reassigned / duplicate / unordered",
    "sequence_errors": "per-producer sequence accounting, summed: gaps / duplicates / out_of_order / seq_anomalies",
    "curve_handshakes": "CurveZMQ handshakes: accepted / refused",
}


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


class DiagnosticsCollector:
    """Prometheus collector over a :class:`Diagnostics`."""

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
        for name, (metric, scale, documentation) in THROUGHPUT_METRICS.items():
            value = getattr(snap.throughput, name)
            if value is not None:
                yield _gauge(metric, documentation, value * scale)
        ratio = GaugeMetricFamily("linepack_mask_ratio", "supervised / candidates per row, percentiles over the window",
                                  labels=["window", "percentile"])
        for window, numbers in (("batch", snap.batch.mask_ratio if snap.batch else None), ("cumulative", snap.cumulative.mask_ratio)):
            for key in ("p10", "p50", "p90"):
                if numbers is not None and getattr(numbers, key) is not None:
                    ratio.add_metric([window, key.removeprefix("p")], getattr(numbers, key))
        yield ratio
        yield from source_metrics(snap)
        yield from stream_metrics(snap.stream)
        alarm = GaugeMetricFamily("linepack_alarm_active", "1 while the alarm is raised", labels=["alarm"])
        for state in snap.alarms:
            alarm.add_metric([state.name], float(state.active))
        yield alarm


def source_metrics(snap: DiagnosticsResponse) -> Iterator[Any]:
    """A mixture's numbers with a ``source`` label: val and train loss, val floor, rows, shares, epochs (none for a single corpus)."""
    if snap.sources is None:
        return
    loss = GaugeMetricFamily("linepack_source_loss_nats", "cross-entropy of one source's rows: the fixed val set's (split val), "
                             "the last log interval's (split train)", labels=["split", "source"])
    floor = GaugeMetricFamily("linepack_source_context_free_floor_nats", "lowest val loss of one source's rows without context",
                              labels=["split", "source"])
    rows = CounterMetricFamily("linepack_source_rows", "train rows of one source handed to the training loop", labels=["source"])
    share = GaugeMetricFamily("linepack_source_share_ratio", "a source's share of the train rows: achieved and target",
                              labels=["source", "kind"])
    epochs = GaugeMetricFamily("linepack_source_epochs_completed", "epochs of one source the training loop has taken",
                               labels=["source"])
    for name, numbers in snap.sources.items():
        for family, split, value in ((loss, "val", (snap.loss.val_by_source or {}).get(name)),
                                     (loss, "train", (snap.loss.train_by_source or {}).get(name)),
                                     (floor, "val", (snap.loss.context_free_floor_val_by_source or {}).get(name))):
            if value is not None:
                family.add_metric([split, name], value)
        rows.add_metric([name], numbers.rows)
        share.add_metric([name, "target"], numbers.target_share)
        if numbers.share is not None:
            share.add_metric([name, "achieved"], numbers.share)
        if numbers.epochs_completed is not None:
            epochs.add_metric([name], numbers.epochs_completed)
    yield from (loss, floor, rows, share, epochs)


def stream_metrics(stream: StreamStats | None) -> Iterator[Any]:
    """The stream's counters and gauges (by field metadata), rejections by reason, and per producer."""
    if stream is None:
        return
    families: dict[str, Any] = {}
    for f in merged_fields():
        metric, label, value = f.metadata["metric"], f.metadata["label"], getattr(stream, f.name)
        if metric is None or value is None:
            continue
        if metric not in families:
            kind = CounterMetricFamily if f.metadata["kind"] == "counter" else GaugeMetricFamily
            help_text = FAMILY_HELP.get(metric, f.metadata["help"])
            families[metric] = kind(f"linepack_stream_{metric}", help_text, labels=["kind"] if label is not None else None)
        families[metric].add_metric([label] if label is not None else [], float(value))
    yield from families.values()
    reasons = CounterMetricFamily("linepack_stream_rejected", "rejected messages by reason", labels=["reason"])
    for reason, count in sorted(stream.rejected.items()):
        reasons.add_metric([reason], count)
    yield reasons
    producers = CounterMetricFamily("linepack_stream_producer", "per-producer message accounting", labels=["producer", "kind"])
    for producer, row in sorted(stream.producers.items()):
        for kind in ("messages", "gaps", "duplicates", "out_of_order", "orders_delivered", "orders_reassigned"):
            producers.add_metric([producer, kind], getattr(row, kind))
    yield producers


def registry_for(diagnostics: Diagnostics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DiagnosticsCollector(diagnostics))
    return registry
