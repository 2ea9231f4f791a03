"""Mixtures on the trainer side: the val loss and floor per source, the mix per source, its alarm,
and what /diagnostics, /metrics, /history and metrics.jsonl show (and do not show for one corpus)."""

from __future__ import annotations

import collections
import dataclasses
import math

import httpx
import pytest
import torch
import torch.nn as nn
from prometheus_client.parser import text_string_to_metric_families
from unit.trainer.test_page import CHROMIUM, chromium

from trainer.diagnostics.alarms import AlarmInputs, AlarmSettings, evaluate_alarms
from trainer.diagnostics.floor import context_free_floor, entropy, source_floors
from trainer.diagnostics.http import create_app, serve_in_thread
from trainer.diagnostics.mixture import SourceNumbers, source_numbers
from trainer.diagnostics.state import Diagnostics
from trainer.loop.numbers import EvalNumbers
from trainer.model.evaluation import evaluate

from helpers.streams import TEXT, UNIFORM, FakeConsumer, SyntheticStream, halves, make_trainer, mixture_meta
from helpers.wire import make_meta

VOCAB = 4


class RowScaleModel(nn.Module):
    """Logits ``x`` on class 0 and 0 elsewhere: a position with ``y = 0`` costs ``log(1 + (V-1) e^-x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, attention_mask):
        logits = torch.zeros((*x.shape, VOCAB))
        logits[..., 0] = x.float()
        return logits


def position_loss(x: float) -> float:
    return math.log(1 + (VOCAB - 1) * math.exp(-x))


def hand_made_batch(scales, supervised, sources, stages=None):
    """One row per entry: every position of row r has input ``scales[r]``, its first
    ``supervised[r]`` positions are supervised with target 0."""
    rows, length = len(scales), 6
    x = torch.tensor(scales, dtype=torch.int64)[:, None].expand(rows, length).clone()
    y = torch.full((rows, length), -100, dtype=torch.int64)
    for row, count in enumerate(supervised):
        y[row, :count] = 0
    batch = {"x": x, "y": y, "attention_mask": torch.ones_like(x), "mask_ratio": torch.full((rows,), 0.5),
             "source": torch.tensor(sources, dtype=torch.int64)}
    if stages is not None:
        batch["stage"] = torch.tensor(stages, dtype=torch.int64)
    return batch


def test_val_loss_per_source_is_the_mean_over_that_sources_rows_only():
    batches = [hand_made_batch([0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 0, 2], stages=[0, 0, 1, 1]),
               hand_made_batch([4, 5], [5, 6], [2, 0], stages=[1, 0])]
    rows = [(0, 1, 0, 0), (1, 2, 1, 0), (2, 3, 0, 1), (3, 4, 2, 1), (4, 5, 2, 1), (5, 6, 0, 0)]  # scale, supervised, source, stage

    def mean(selected):
        return sum(position_loss(s) * n for s, n, *_ in selected) / sum(n for _, n, *_ in selected)

    result = evaluate(RowScaleModel(), batches)
    assert result.by_source == pytest.approx({str(k): mean([r for r in rows if r[2] == k]) for k in (0, 1, 2)}, rel=1e-6)
    assert result.by_stage == pytest.approx({str(k): mean([r for r in rows if r[3] == k]) for k in (0, 1)}, rel=1e-6)
    assert result.loss == pytest.approx(mean(rows), rel=1e-6) and result.supervised == 21
    named = evaluate(RowScaleModel(), batches, source_names=("a", "b", "c")).by_source
    assert named == {name: result.by_source[str(index)] for index, name in enumerate("abc")}
    without = evaluate(RowScaleModel(), [{k: v for k, v in b.items() if k not in ("source", "stage")} for b in batches])
    assert without.by_source == {} and without.by_stage == {} and without.loss == pytest.approx(result.loss, rel=1e-12)


# ---- floors, the mix, the alarm ---------------------------------------------------------------


def test_each_source_has_the_floor_of_its_own_counts_and_the_stream_keeps_its_own():
    meta = mixture_meta(SyntheticStream().meta, halves(), {"code": 0.2, "prose": 0.8})
    floors = source_floors(meta, "val")
    assert list(floors) == ["code", "prose"] and floors["code"] != pytest.approx(floors["prose"], rel=1e-3)
    for source in meta.sources:
        alone = dataclasses.replace(meta, sources=(), corpus_fingerprint="0" * 16, token_counts=source.token_counts)
        assert floors[source.name] == pytest.approx(context_free_floor(alone, "val"), rel=1e-12)
    assert context_free_floor(meta, "val") not in floors.values()
    masked_only = mixture_meta(make_meta(text=TEXT, corruption={**UNIFORM, "mask_fractions": [1, 0, 0]}), halves(),
                               {"code": 1, "prose": 1})
    for source, floor in zip(masked_only.sources, source_floors(masked_only).values()):
        assert floor == pytest.approx(entropy(source.counts / source.counts.sum()), rel=1e-12)  # all [MASK]: H(p)
    assert source_floors(SyntheticStream().meta) == {}


def test_the_mix_per_source_shares_epochs_and_exhaustion():
    meta = mixture_meta(SyntheticStream().meta, halves(), {"code": 1, "prose": 3}, max_epochs={"code": 2}, epoch_rows=10)
    mix = source_numbers(meta, {"code": 20, "prose": 59})
    assert mix["code"] == SourceNumbers(target_share=0.25, rows=20, share=20 / 79, epoch_rows=10, epochs_completed=2,
                                        max_epochs=2, exhausted=True)
    assert mix["prose"].epochs_completed == 5 and mix["prose"].max_epochs is None and not mix["prose"].exhausted
    assert not source_numbers(meta, {"code": 19})["code"].exhausted and source_numbers(meta, {})["code"].share is None


def test_source_exhausted_alarm_names_the_source_and_clears_without_one():
    settings = AlarmSettings()
    quiet = evaluate_alarms(AlarmInputs(), settings, {}, 0.0)["source_exhausted"]
    assert not quiet.active and quiet.explanation
    alarm = evaluate_alarms(AlarmInputs(step=7, exhausted_sources=(("code", 2),)), settings, {}, 5.0)["source_exhausted"]
    assert alarm.active and "'code' (2 epochs)" in alarm.explanation and alarm.since_step == 7 and "max_epochs" in alarm.check


# ---- what the diagnostics show ------------------------------------------------------------------


class MixtureConsumer(FakeConsumer):
    """A FakeConsumer of a two-source mixture: a quarter of the rows (0 and 4 of each batch) are code."""

    def __init__(self, max_epochs=None, epoch_rows=0) -> None:
        super().__init__()
        self.meta = mixture_meta(self.meta, halves(), {"code": 0.25, "prose": 0.75}, max_epochs, epoch_rows)
        for batch in self._val:
            batch["source"] = SOURCES
        self.rows = collections.Counter()

    def next_batch(self, split="train", timeout=None):
        batch = {**super().next_batch(split, timeout), "source": SOURCES}
        self.rows.update({"code": 2, "prose": 6})
        return batch

    def stats(self):
        return dataclasses.replace(super().stats(), rows_by_source=dict(self.rows))


SOURCES = (torch.arange(8) % 4 != 0).long()


def served(tmp_path, consumer):
    diagnostics = Diagnostics(consumer, probe_interval=10, no_context_positions=64)
    make_trainer(tmp_path, consumer, diagnostics).run()
    return diagnostics, serve_in_thread(create_app(diagnostics), "127.0.0.1", 0)


def metric_samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_mixture_shows_per_source_losses_floors_and_mix_everywhere(tmp_path):
    consumer = MixtureConsumer(max_epochs={"code": 3}, epoch_rows=20)
    diagnostics, server = served(tmp_path, consumer)
    url = f"http://127.0.0.1:{server.port}"
    try:
        body = httpx.get(f"{url}/diagnostics", timeout=10).json()
        history = httpx.get(f"{url}/history", timeout=10).json()
        samples = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text)
        schema = httpx.get(f"{url}/openapi.json", timeout=10).json()["components"]["schemas"]
    finally:
        server.stop()
    loss = body["loss"]
    floors = source_floors(consumer.meta, "val")
    assert set(loss["val_by_source"]) == {"code", "prose"} and loss["context_free_floor_val_by_source"] == pytest.approx(floors)
    assert loss["val_by_source"]["code"] != pytest.approx(loss["val_by_source"]["prose"])
    assert body["sources"]["code"] == {"target_share": 0.25, "rows": 60, "share": 0.25, "epoch_rows": 20, "epochs_completed": 3,
                                       "max_epochs": 3, "exhausted": True}
    assert body["sources"]["prose"]["rows"] == 180 and body["sources"]["prose"]["epochs_completed"] == 9
    assert [s["name"] for s in body["meta"]["sources"]] == ["code", "prose"]
    alarm = next(a for a in body["alarms"] if a["name"] == "source_exhausted")
    assert alarm["active"] and "'code'" in alarm["explanation"]
    assert history["eval"]["step"] == [0, 10, 20, 30]
    for name in ("code", "prose"):
        assert history["eval"][f"val_source.{name}"][-1] == pytest.approx(loss["val_by_source"][name])
        assert samples[("linepack_source_loss_nats", (("source", name), ("split", "val")))] == pytest.approx(loss["val_by_source"][name])
        assert samples[("linepack_source_context_free_floor_nats", (("source", name), ("split", "val")))] == pytest.approx(floors[name])
    assert history["context_free_floor_val_by_source"] == pytest.approx(floors)
    assert set(loss["train_by_source"]) == {"code", "prose"}
    for name, value in loss["train_by_source"].items():
        assert samples[("linepack_source_loss_nats", (("source", name), ("split", "train")))] == pytest.approx(value)
    assert samples[("linepack_source_rows_total", (("source", "prose"),))] == 180
    assert samples[("linepack_source_share_ratio", (("kind", "target"), ("source", "code")))] == 0.25
    assert samples[("linepack_source_epochs_completed", (("source", "code"),))] == 3
    assert samples[("linepack_alarm_active", (("alarm", "source_exhausted"),))] == 1
    assert {"val_by_source", "train_by_source", "context_free_floor_val_by_source"} <= set(schema["LossNumbers"]["properties"])
    assert "sources" in schema["DiagnosticsResponse"]["properties"] and "SourceNumbers" in schema


def test_a_single_corpus_shows_no_per_source_numbers(tmp_path):
    diagnostics, server = served(tmp_path, FakeConsumer())
    url = f"http://127.0.0.1:{server.port}"
    try:
        body = httpx.get(f"{url}/diagnostics", timeout=10).json()
        history = httpx.get(f"{url}/history", timeout=10).json()
        text = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        server.stop()
    assert body["sources"] is None and body["meta"]["sources"] == []
    assert body["loss"]["val_by_source"] is None and body["loss"]["context_free_floor_val_by_source"] is None
    assert body["loss"]["train_by_source"] is None
    assert history["context_free_floor_val_by_source"] is None and not any(k.startswith("val_source.") for k in history["eval"])
    assert "linepack_source_" not in text
    assert not next(a for a in body["alarms"] if a["name"] == "source_exhausted")["active"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); the render test needs it")
def test_the_page_draws_a_mixture_and_lists_its_sources(tmp_path):
    _, server = served(tmp_path / "run", MixtureConsumer())
    try:
        dom = chromium(f"http://127.0.0.1:{server.port}/", tmp_path / "profile", "--dump-dom").stdout.decode()
    finally:
        server.stop()
    assert 'data-rendered="charts"' in dom, dom[-2000:]
    card = dom.split('id="sources-card"', 1)[1].split("</section>", 1)[0]
    assert "hidden" not in card.split(">", 1)[0]
    assert "<td>code</td>" in card and "<td>prose</td>" in card and "25.00 %" in card and "75.00 %" in card


def test_an_evals_losses_are_in_the_history_while_its_probe_still_runs():
    """The page's chart shows each source's val loss as soon as the table does (the probe comes after)."""
    diagnostics = Diagnostics(MixtureConsumer())
    seen = []

    class SlowProbe:
        def due(self, step):
            return True

        def run(self, model, batches, step):
            seen.append(diagnostics.history()["eval"])
            raise RuntimeError("stop here")

    diagnostics.prober, diagnostics._model = SlowProbe(), object()
    with pytest.raises(RuntimeError, match="stop here"):
        diagnostics.on_eval(EvalNumbers(step=7, val_loss=3.0, val_loss_by_stage={}, val_supervised=10, eval_ms=1.0,
                                        before_training=False, val_loss_by_source={"code": 3.5, "prose": 2.9}))
    assert seen == [{"step": [7], "time": seen[0]["time"], "val": [3.0], "val_source.code": [3.5], "val_source.prose": [2.9]}]


def test_train_loss_per_source_is_over_that_sources_rows_and_its_weighted_mean_is_the_train_loss(tmp_path):
    """``train_loss_by_source`` (unweighted, like the per-stage numbers): each source's mean over
    its own supervised positions of the log interval, by name; weighted by those positions, the
    train loss. In metrics.jsonl too."""
    import json

    from trainer.loop.config import TrainConfig
    from trainer.loop.train import Trainer

    from helpers.streams import TINY_MODEL

    class Remembering(MixtureConsumer):
        def next_batch(self, split="train", timeout=None):
            batch = super().next_batch(split, timeout)
            if split == "train":
                self.last_train = batch
            return batch

    class LogSteps:
        def __init__(self):
            self.last = None

        def on_start(self, start): ...
        def on_eval(self, numbers): ...
        def on_end(self, summary): ...

        def on_step(self, numbers):
            self.last = numbers if numbers.log else self.last

    consumer, seen = Remembering(), LogSteps()
    config = TrainConfig(out_dir=str(tmp_path), batch_size=8, max_iters=6, eval_interval=10, log_interval=1,
                         device="cpu", lr=3e-3, warmup_iters=5, seed=1)
    run = Trainer(config, TINY_MODEL, consumer, [seen])
    run.prepare(wait_timeout=5)
    run.run()
    y = consumer.last_train["y"]
    supervised = {name: int(((y != -100) & (SOURCES[:, None] == index)).sum()) for index, name in enumerate(("code", "prose"))}
    by_source = seen.last.train_loss_by_source
    assert set(by_source) == {"code", "prose"} and by_source["code"] != pytest.approx(by_source["prose"], rel=1e-6)
    weighted = sum(by_source[name] * count for name, count in supervised.items()) / sum(supervised.values())
    assert weighted == pytest.approx(seen.last.train_loss, rel=1e-5)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
    assert [set(r["train_loss_by_source"]) for r in records if r["kind"] == "train"] == [{"code", "prose"}] * 6
