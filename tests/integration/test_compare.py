"""``python -m trainer.compare`` end to end: real producer and trainer processes, tiny model, few steps.

The report is checked against values computed here from what the arms left on disk: the
common recording (floor), the checkpoints (common-set loss, packing, loss weighting) and the
metrics files (curves).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from shared.corruption import BertPolicy
from shared.recording import RecordingReader
from shared.vocab import IGNORE_INDEX
from trainer import compare
from trainer.diagnostics.floor import context_free_floor
from trainer.loop.checkpoint import load_checkpoint
from trainer.model.losses import token_losses

from helpers.wire import recorded_batches

pytestmark = pytest.mark.slow

STEPS, EVAL_EVERY, LOG_EVERY = 12, 6, 3
TINY = ["--block-size", "32", "--rows-per-message", "8", "--batch-size", "8", "--max-iters", str(STEPS),
        "--eval-interval", str(EVAL_EVERY), "--log-interval", str(LOG_EVERY), "--eval-batches", "2",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--warmup-iters", "2", "--device", "cpu",
        "--poll-s", "0.2", "--arm-timeout-s", "120"]


def run_compare(out, *flags):
    status = compare.main(["--out", str(out), *TINY, *flags])
    assert status == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def uniform(tmp_path_factory):
    out = tmp_path_factory.mktemp("uniform")
    return out, run_compare(out, "--policy", "uniform", "--loss-weighting", "inverse-t")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    out = tmp_path_factory.mktemp("bert")
    return out, run_compare(out, "--policy", "bert")


def common_set(out):
    """(meta, val messages by val_index) of the common recording, read independently of compare."""
    messages = {}
    for message in recorded_batches(RecordingReader(out / compare.COMMON_NAME)):
        messages[message.val_index] = message
    return messages[0].meta, messages


def loss_on_common(out, arm):
    """The arm's final checkpoint on the common set: mean cross-entropy over supervised positions."""
    checkpoint = load_checkpoint(out / arm / "ckpt.pt")
    model = checkpoint.build_model()
    _, messages = common_set(out)
    total, count = 0.0, 0
    with torch.no_grad():
        for message in messages.values():
            x, y, mask = (torch.from_numpy(message.tensors[n].astype("int64")) for n in ("x", "y", "attention_mask"))
            logits = model(x, mask)
            total += float(token_losses(logits, y).sum())
            count += int((y != IGNORE_INDEX).sum())
    return total / count, checkpoint


def test_the_report_holds_both_arms_curves_and_the_floor(uniform):
    out, report = uniform
    assert (out / "report.md").exists() and (out / compare.COMMON_NAME).exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["arms"]) == {"fixed", "lines"}
    for name, arm in report["arms"].items():
        assert arm["packing"] == name
        assert [p["step"] for p in arm["train"]] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        assert [p["step"] for p in arm["val"]] == list(range(0, STEPS + 1, EVAL_EVERY))
        assert all(math.isfinite(p["train_loss"]) for p in arm["train"])
        assert all(math.isfinite(p["val_loss"]) for p in arm["val"])
        assert arm["final"]["steps"] == STEPS and arm["final"]["val_loss"] == arm["val"][-1]["val_loss"]
        assert arm["final"]["ms_per_step"] > 0 and arm["final"]["tokens_per_s"] > 0
        assert arm["stream"]["rejected_total"] == 0 and arm["stream"]["gaps"] == 0 and arm["stream"]["duplicates"] == 0
        assert (out / name / "trainer.log").exists() and (out / name / "producer-0.log").exists()

    meta, messages = common_set(out)
    assert meta.packing == "lines" and meta.seed == 1 and sorted(messages) == list(range(meta.val_messages))
    floor = context_free_floor(meta, "val")
    assert report["context_free_floor"] == pytest.approx(floor)
    assert report["common_val"]["rows"] == sum(len(m.tensors["x"]) for m in messages.values())
    for arm in report["arms"].values():
        live = arm["live_diagnostics"]
        if live is not None:  # the trainer process's own floor, from its /diagnostics
            assert live["context_free_floor_val"] == pytest.approx(floor)


def test_the_arms_differ_only_in_packing_and_the_common_losses_are_real(uniform):
    out, report = uniform
    metas, model_configs = {}, {}
    for name, arm in report["arms"].items():
        loss, checkpoint = loss_on_common(out, name)
        assert arm["final"]["val_loss_common"] == pytest.approx(loss, rel=1e-5)
        assert arm["final"]["below_floor_common"] == pytest.approx(report["context_free_floor"] - loss, rel=1e-5)
        assert checkpoint.step == STEPS and checkpoint.train_config["loss_weighting"] == "inverse-t"
        metas[name] = checkpoint.meta
        model_configs[name] = checkpoint.model_config
    assert metas["fixed"].packing == "fixed" and metas["lines"].packing == "lines"
    assert {field for field, _, _ in metas["fixed"].differences(metas["lines"])} <= {"packing", "val_messages"}
    assert metas["lines"].corruption.policy.name == "uniform"
    assert model_configs["fixed"] == model_configs["lines"]

    comparison = report["comparison"]
    fixed, lines = (report["arms"][a]["final"]["val_loss_common"] for a in ("fixed", "lines"))
    assert comparison["val_loss_common_lines_over_fixed"] == pytest.approx(lines / fixed)
    assert report["settings"]["loss_weighting"] == "inverse-t" and report["settings"]["policy"] == "uniform"
    table = (out / "report.md").read_text()
    assert f"**{fixed:.4f}**" in table and f"**{lines:.4f}**" in table and "`inverse-t`" in table


def test_the_bert_policy_reaches_both_arms_and_its_floor(bert):
    out, report = bert
    meta, _ = common_set(out)
    assert meta.corruption.policy == BertPolicy(0.15)
    assert report["context_free_floor"] == pytest.approx(context_free_floor(meta, "val"))
    for name in ("fixed", "lines"):
        loss, checkpoint = loss_on_common(out, name)
        assert checkpoint.meta.corruption == meta.corruption
        assert checkpoint.train_config["loss_weighting"] == "none"
        assert report["arms"][name]["final"]["val_loss_common"] == pytest.approx(loss, rel=1e-5)
    assert "policy `bert (15%)`" in (out / "report.md").read_text()


def test_a_trainer_that_refuses_to_start_fails_the_comparison(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LINEPACK_RESUME", "always")  # inherited by the arms' trainers: there is no checkpoint to resume
    status = compare.main(["--out", str(tmp_path), *TINY])
    assert status == 1
    assert "the fixed trainer exited with 2" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_a_second_comparison_into_the_same_out_overwrites_nothing(uniform, capsys):
    out, _ = uniform
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert compare.main(["--out", str(out), *TINY]) == 2
    assert f"{out / 'fixed'} (ckpt.pt and metrics.jsonl)" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_an_impossible_model_is_a_usage_error_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        compare.main(["--out", str(tmp_path), *TINY, "--n-head", "3"])  # 32 is not a multiple of 3
    assert stopped.value.code == 2 and "not a multiple of n_head 3" in capsys.readouterr().err
    assert not (tmp_path / "fixed").exists()
