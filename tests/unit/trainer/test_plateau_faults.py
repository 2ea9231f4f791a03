"""The plateau's cause, demonstrated (docs/SPEC.md §9.1): an inverted key-padding mask is refused at
start-up, and, forced through with the self-test bypassed, keeps val loss at the context-free
floor while ``context_blind`` fires in ``GET /diagnostics``; with the correct mask it stays quiet.

Real producer batches (``producer.stream.BatchStream``, line-aligned, bert 15 %) of the
built-in corpus feed the real ``Trainer`` in process; the model is tiny so a run takes seconds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import trainer.loop.train
from producer.corpus import Corpus
from producer.stream import BatchStream
from shared.data_config import DataConfig
from trainer.data.source import KnownStream
from trainer.data.stats import StreamStats
from trainer.diagnostics.alarms import AlarmSettings
from trainer.diagnostics.floor import context_free_floor
from trainer.diagnostics.http import create_app
from trainer.diagnostics.state import Diagnostics
from trainer.loop.config import TrainConfig
from trainer.loop.train import Trainer
from trainer.model.selftest import MaskSelfTestError
from trainer.model.transformer import ModelConfig

from helpers.streams import WORDS, invert_key_padding_mask

BATCH_SIZE = 16
STEPS = 300
ALARM_WARMUP = 150
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=64)
DATA = DataConfig(block_size=64, rows_per_message=8, packing="lines", policy="bert", seed=0)


class StreamConsumer(KnownStream):
    """The DatasetConsumer methods the Trainer and Diagnostics use, over a producer BatchStream
    in this process (no sockets): batches of BATCH_SIZE rows in the consumer's dtypes."""

    def __init__(self, stream: BatchStream) -> None:
        self.meta = stream.meta
        self._messages = stream.train_batches()
        self._val = [self._batch([message]) for message in stream.val_set()]
        self.consumed = 0

    @staticmethod
    def _batch(messages: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        rows = {name: np.concatenate([m[name] for m in messages]) for name in ("x", "y", "attention_mask", "mask_ratio")}
        batch = {name: torch.from_numpy(array.astype(np.int64)) for name, array in rows.items() if name != "mask_ratio"}
        return {**batch, "mask_ratio": torch.from_numpy(rows["mask_ratio"].astype(np.float32))}

    def next_batch(self, split="train", timeout=None):
        self.consumed += 1
        return self._batch([next(self._messages) for _ in range(BATCH_SIZE // DATA.rows_per_message)])

    def stats(self):
        """DatasetConsumer.stats() of a clean stream: every message accepted, none lost."""
        messages = self.consumed * (BATCH_SIZE // DATA.rows_per_message) + len(self._val)
        return StreamStats(
            received=messages, accepted=messages, consumed_messages=messages, consumed_batches=self.consumed,
            seconds_since_last_message=0.0, val_messages_seen=len(self._val), val_messages_total=self.meta.val_messages,
            meta_digest=self.meta.digest,
        )


def word_corpus(lines: int = 2000, seed: int = 0) -> Corpus:
    """Lines of 3 to 9 words from a 15-word list: each character is easy to infer from its
    neighbours, so a tiny model that sees its context leaves the floor within a few hundred steps."""
    rng = np.random.default_rng(seed)
    text = "".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 10))) + "\n" for _ in range(lines))
    return Corpus(text, "words", "0" * 16)


@pytest.fixture(scope="module")
def stream() -> BatchStream:
    return BatchStream(DATA, word_corpus())


def make_trainer(tmp_path, stream: BatchStream, diagnostics: Diagnostics) -> Trainer:
    config = TrainConfig(out_dir=str(tmp_path), batch_size=BATCH_SIZE, max_iters=STEPS, eval_interval=STEPS,
                         log_interval=50, device="cpu", lr=5e-3, min_lr=5e-4, warmup_iters=20, seed=0)
    return Trainer(config, MODEL, StreamConsumer(stream), [diagnostics])


def train_and_diagnose(tmp_path, stream: BatchStream) -> dict:
    """Train STEPS steps with the live diagnostics attached; the ``GET /diagnostics`` answer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend with other work on the host
    try:
        diagnostics = Diagnostics(alarm_settings=AlarmSettings(warmup_steps=ALARM_WARMUP))
        run = make_trainer(tmp_path, stream, diagnostics)
        run.prepare(wait_timeout=5)
        run.run()
    finally:
        torch.set_num_threads(threads)  # the rest of the test session keeps its own setting
    response = TestClient(create_app(diagnostics)).get("/diagnostics")
    assert response.status_code == 200
    answer = response.json()
    print("plateau-faults:", json.dumps({"val": answer["loss"]["val"], "floor": answer["loss"]["context_free_floor_val"],
                                         "probe": answer["attention_probe"], "alarms": answer["alarms"]}))  # shown on failure
    return answer


def alarm(answer: dict, name: str) -> dict:
    return next(a for a in answer["alarms"] if a["name"] == name)


def test_an_inverted_mask_is_refused_before_the_first_step(tmp_path, stream, monkeypatch):
    invert_key_padding_mask(monkeypatch)
    run = make_trainer(tmp_path, stream, Diagnostics())
    with pytest.raises(MaskSelfTestError, match="inverted"):
        run.prepare(wait_timeout=5)
    assert run.step == 0 and not (tmp_path / "metrics.jsonl").exists()


def test_forced_through_an_inverted_mask_sits_at_the_floor_and_context_blind_fires(tmp_path, stream, monkeypatch):
    invert_key_padding_mask(monkeypatch)
    monkeypatch.setattr(trainer.loop.train, "mask_self_test", lambda model, batch, meta: {"bypassed": True})
    answer = train_and_diagnose(tmp_path, stream)

    floor = context_free_floor(stream.meta, "val")
    assert answer["loss"]["context_free_floor_val"] == pytest.approx(floor)
    val = answer["loss"]["val"]
    assert math.isfinite(val) and abs(val - floor) < 0.1, (val, floor)
    blind = alarm(answer, "context_blind")
    assert blind["active"] and blind["since_step"] == STEPS
    assert "not using context" in blind["explanation"]
    # The probe says why: hiding every other position changes nothing.
    assert abs(answer["attention_probe"]["loss_no_context_minus_attn"]) < 0.02


def test_with_the_correct_mask_the_same_run_learns_from_context_and_stays_quiet(tmp_path, stream):
    answer = train_and_diagnose(tmp_path, stream)

    floor = context_free_floor(stream.meta, "val")
    assert answer["loss"]["val"] < floor - 0.2, (answer["loss"]["val"], floor)
    assert answer["attention_probe"]["loss_no_context_minus_attn"] > 0.2
    assert not alarm(answer, "context_blind")["active"]
    assert answer["step"] == STEPS >= ALARM_WARMUP  # the check was armed, not warming up
