"""The training loop in process, with an in-memory consumer (integration/test_train_processes.py: as real processes)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from trainer.data.source import KnownStream
from trainer.data.stats import StreamStats
from trainer.loop.checkpoint import load_checkpoint
from trainer.loop.config import TrainConfig
from trainer.loop.schedule import learning_rate
from trainer.loop.train import Trainer
from trainer.model.selftest import MaskSelfTestError
from trainer.model.transformer import ModelConfig

from helpers.streams import SyntheticStream, halves, invert_key_padding_mask, mixture_meta

# Learned positions: the synthetic stream's 64 short lines are learnt fastest by absolute position, which
# keeps the 40-step loss check below sharp; rotary (the default) is trained in test_model.py and the compare runs.
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.1, positions="learned")


class MemoryConsumer(KnownStream):
    """The DatasetConsumer methods the Trainer uses, over lists of batches."""

    def __init__(self, meta, train_batches, val_batches):
        self.meta = meta
        self._train = iter(train_batches)
        self._val = val_batches
        self.consumed = 0

    def next_batch(self, split="train", timeout=None):
        self.consumed += 1
        return next(self._train)

    def stats(self):
        return StreamStats(consumed_batches=self.consumed)


class StepLosses:
    def __init__(self):
        self.losses = {}
        self.numbers = {}
        self.evals = {}
        self.summary = None

    def on_start(self, start):
        self.start = start

    def on_step(self, numbers):
        self.losses[numbers.step] = numbers.step_loss
        self.numbers[numbers.step] = numbers.record()

    def on_eval(self, numbers):
        self.evals[numbers.step] = numbers.record()

    def on_end(self, summary):
        self.summary = summary.record()


def data(n_train, seed=0, block_size=48, batch_size=8):
    stream = SyntheticStream(block_size=block_size, batch_size=batch_size, seed=seed)
    val = stream.batches(2)
    return stream.meta, stream.batches(n_train), val


def train(tmp_path, train_batches, meta, val, observers=(), **overrides):
    settings = dict(out_dir=str(tmp_path), batch_size=8, max_iters=len(train_batches), eval_interval=10,
                    log_interval=5, device="cpu", lr=3e-3, min_lr=3e-4, warmup_iters=5, seed=1)
    config = TrainConfig(**{**settings, **overrides})
    run = Trainer(config, MODEL, MemoryConsumer(meta, train_batches, val), observers)
    run.prepare(wait_timeout=5)
    return run, run.run().record()


def test_loss_decreases_and_metrics_are_written(tmp_path):
    meta, batches, val = data(40)
    steps = StepLosses()
    run, summary = train(tmp_path, batches, meta, val, [steps])
    assert summary["steps"] == 40 and summary["stream"] == StreamStats(consumed_batches=40).to_dict()
    assert steps.evals[40]["val_loss"] < steps.evals[0]["val_loss"] - 0.5
    assert summary["val_loss"] == steps.evals[40]["val_loss"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert train_records[-1]["train_loss"] < train_records[0]["train_loss"]
    assert {"lr", "ms_per_step", "tokens_per_s", "data_wait_fraction", "grad_norm"} <= set(train_records[0])
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 10, 20, 30, 40]
    assert records[-1]["kind"] == "summary"
    assert run.self_test["padding_check"] == "passed"
    assert not os.path.exists(tmp_path / "ckpt.pt.tmp")


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    meta, batches, val = data(20, seed=3)
    whole = StepLosses()
    train(tmp_path / "whole", batches, meta, val, [whole], lr_decay_iters=20)

    first = StepLosses()
    train(tmp_path / "split", batches[:10], meta, val, [first], lr_decay_iters=20)
    checkpoint = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert checkpoint.step == 10 and checkpoint.meta == meta
    second = StepLosses()
    run, _ = train(tmp_path / "split", batches[10:], meta, val, [second], lr_decay_iters=20, max_iters=20, resume="always")
    assert run.step == 20
    assert {**first.losses, **second.losses} == whole.losses  # bit-exact, dropout included
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps[:2] == [0, 5] and steps[-3:] == [20, 20, 20]  # train, eval, summary; the curve goes on


def test_a_run_without_resume_never_overwrites_an_earlier_one(tmp_path):
    meta, batches, val = data(10, seed=3)
    train(tmp_path, batches, meta, val)
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"holds an earlier run \(ckpt.pt and metrics.jsonl\) and --resume was not given"):
        train(tmp_path, batches, meta, val)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    (tmp_path / "ckpt.pt").unlink()  # a run stopped before its first checkpoint: its metrics are kept too
    with pytest.raises(ValueError, match=r"holds an earlier run \(metrics.jsonl\)"):
        train(tmp_path, batches, meta, val)
    _, summary = train(tmp_path, batches, meta, val, resume="auto")  # no checkpoint: a new run, appended
    lines = (tmp_path / "metrics.jsonl").read_bytes()
    assert lines.startswith(before["metrics.jsonl"]) and summary["steps"] == 10


def test_same_seed_and_stream_give_identical_losses_and_another_seed_does_not(tmp_path):
    meta, batches, val = data(10, seed=4)
    runs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        steps = StepLosses()
        train(tmp_path / name, batches, meta, val, [steps], seed=seed)
        runs.append(steps.losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_an_inverted_mask_makes_the_trainer_refuse_to_start(tmp_path, monkeypatch):
    invert_key_padding_mask(monkeypatch)
    meta, batches, val = data(3)
    with pytest.raises(MaskSelfTestError):
        train(tmp_path, batches, meta, val)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_resume_refuses_a_stream_with_another_vocabulary(tmp_path):
    meta, batches, val = data(10)
    train(tmp_path, batches, meta, val)
    other = SyntheticStream(text="completely different text\nwith other letters: XYZ\n", block_size=48, batch_size=8)
    with pytest.raises(ValueError, match="another stream.*vocab"):
        train(tmp_path, other.batches(2), other.meta, other.batches(1), resume="always", max_iters=12)


def test_val_loss_is_reported_per_stage(tmp_path):
    meta, batches, val = data(5)
    for batch in [*batches, *val]:
        batch["stage"] = torch.arange(8) % 2
    steps = StepLosses()
    run, summary = train(tmp_path, batches, meta, val, [steps], eval_interval=5)
    by_stage = steps.evals[5]["val_loss_by_stage"]
    assert set(by_stage) == {"0", "1"}
    expected = {}
    for stage in (0, 1):
        rows = [{name: t[batch["stage"] == stage] for name, t in batch.items()} for batch in val]
        expected[str(stage)] = run.evaluate(rows).loss
    assert by_stage == pytest.approx(expected, rel=1e-6)
    overall = steps.evals[5]["val_loss"]
    assert min(by_stage.values()) <= overall <= max(by_stage.values())


def test_val_loss_is_reported_per_source_by_name_with_stages_too_and_written_to_metrics(tmp_path):
    meta, batches, val = data(5)
    meta = mixture_meta(meta, halves(), {"code": 0.25, "prose": 0.75})
    for batch in [*batches, *val]:
        batch["source"] = (torch.arange(8) % 4 != 0).long()  # rows 0 and 4 of each batch are code
        batch["stage"] = torch.arange(8) % 2
    steps = StepLosses()
    run, summary = train(tmp_path, batches, meta, val, [steps], eval_interval=5)
    by_source = steps.evals[5]["val_loss_by_source"]
    expected = {}
    for index, name in enumerate(("code", "prose")):
        rows = [{key: t[batch["source"] == index] for key, t in batch.items()} for batch in val]
        expected[name] = run.evaluate(rows).loss
    assert by_source == pytest.approx(expected, rel=1e-6) and by_source["code"] != pytest.approx(by_source["prose"])
    assert set(steps.evals[5]["val_loss_by_stage"]) == {"0", "1"}
    assert summary["val_loss_by_source"] == by_source
    lines = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8")]
    assert [line["val_loss_by_source"] for line in lines if line["kind"] == "eval"][-1] == by_source
    assert steps.numbers[5]["val_loss_by_source"] == by_source


def test_a_single_corpus_has_no_val_loss_by_source(tmp_path):
    meta, batches, val = data(2)
    steps = StepLosses()
    _, summary = train(tmp_path, batches, meta, val, [steps], eval_interval=2)
    assert "val_loss_by_source" not in steps.evals[2] and "val_loss_by_source" not in summary
    assert all("_loss_by_source" not in line for line in open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8"))


def test_train_loss_is_reported_per_stage_and_its_weighted_mean_is_the_train_loss(tmp_path):
    meta, batches, val = data(4)
    for batch in [*batches, *val]:
        batch["stage"] = torch.arange(8) % 2
    steps = StepLosses()
    train(tmp_path, batches, meta, val, [steps], log_interval=1)
    for step, numbers in steps.numbers.items():
        batch = batches[step - 1]
        by_stage = numbers["train_loss_by_stage"]
        assert set(by_stage) == {"0", "1"}
        counts = {str(s): int(((batch["y"] != -100) & (batch["stage"][:, None] == s)).sum()) for s in (0, 1)}
        weighted = sum(by_stage[s] * counts[s] for s in counts) / sum(counts.values())
        assert weighted == pytest.approx(numbers["train_loss"], rel=1e-5)
        assert by_stage["0"] != pytest.approx(by_stage["1"], rel=1e-6)


def test_train_loss_by_stage_is_empty_without_stages(tmp_path):
    meta, batches, val = data(2)
    steps = StepLosses()
    train(tmp_path, batches, meta, val, [steps], log_interval=1)
    assert all(numbers["train_loss_by_stage"] == {} for numbers in steps.numbers.values())


def test_learning_rate_warms_up_then_decays_to_min_lr():
    config = TrainConfig(out_dir="unused", max_iters=100, lr=1e-3, min_lr=1e-4, warmup_iters=10)
    assert learning_rate(0, config) == pytest.approx(1e-3 / 11)
    assert learning_rate(9, config) == pytest.approx(1e-3 * 10 / 11)
    assert learning_rate(10, config) == pytest.approx(1e-3)
    assert learning_rate(55, config) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 2)) * 9e-4)
    assert learning_rate(100, config) == pytest.approx(1e-4)
    assert learning_rate(500, config) == pytest.approx(1e-4)


def test_weight_decay_applies_to_matrices_only(tmp_path):
    meta, batches, val = data(1)
    run, _ = train(tmp_path, batches, meta, val)
    decayed, plain = run.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
