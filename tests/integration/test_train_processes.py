"""The training loop as real processes: ``python -m producer run``/``replay`` -> ``python -m trainer``
(unit/trainer/test_train.py: the loop in process)."""

from __future__ import annotations

import json
import sys

import pytest

from helpers.processes import Children, Process, free_port

TRAINER_FLAGS = ["--device", "cpu", "--batch-size", "8", "--max-iters", "20", "--eval-interval", "10",
                 "--eval-batches", "1", "--log-interval", "5", "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "32", "--lr", "3e-3", "--warmup-iters", "5", "--seed", "7", "--wait-timeout", "30",
                 "--http-port", "0"]
PRODUCER_FLAGS = ["--block-size", "64", "--rows-per-message", "8", "--policy", "uniform", "--seed", "3"]
PROCESS_TIMEOUT_S = 90


def run_pair(out_dir, producer_args, trainer_args=(), prelude=None):
    """Start a trainer bound to a free port and a producer connected to it; the trainer's (exit status, log)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = ["--bind", endpoint, "--out-dir", str(out_dir), *TRAINER_FLAGS, *trainer_args]
    children = Children()
    try:
        if prelude is None:
            trainer_process = children.start("trainer", *args)
        else:
            script = f"{prelude}\nimport sys\nfrom trainer.__main__ import main\nsys.exit(main({args!r}))"
            trainer_process = children.add(Process("trainer", [sys.executable, "-c", script]))
        children.start("producer", *producer_args, "--connect", endpoint)
        status = trainer_process.wait(PROCESS_TIMEOUT_S)
    finally:
        children.close()
    return status, trainer_process.text()


def losses(out_dir):
    records = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [(r["kind"], r["step"], r.get("train_loss"), r.get("val_loss")) for r in records if r["kind"] != "summary"]


@pytest.mark.slow
def test_processes_train_record_and_replay_identically(tmp_path):
    recording = tmp_path / "stream.lps"
    status, output = run_pair(tmp_path / "live", ["run", *PRODUCER_FLAGS], ["--record", str(recording)])
    assert status == 0, output
    assert "mask self-test passed" in output and "data wait" in output
    live = losses(tmp_path / "live")
    train_losses = [loss for kind, _, loss, _ in live if kind == "train"]
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0] - 0.3, output

    status, output = run_pair(tmp_path / "replayed", ["replay", str(recording)])
    assert status == 0, output
    assert losses(tmp_path / "replayed") == live  # step for step, bit-exact on CPU


@pytest.mark.slow
def test_a_trainer_with_an_inverted_mask_refuses_to_start(tmp_path):
    prelude = (
        "import trainer.model.transformer as model\n"
        "correct = model.key_padding_mask\n"
        "model.key_padding_mask = lambda attention_mask: ~correct(attention_mask)"
    )
    status, output = run_pair(tmp_path, ["run", *PRODUCER_FLAGS], prelude=prelude)
    assert status == 2, output
    assert "refusing to train: the mask self-test failed" in output and "inverted" in output
    assert not (tmp_path / "metrics.jsonl").exists()
