"""trainer.loop.checkpoint: atomic writes, clean failure, weights-only loading."""

import os

import pytest
import torch

from trainer.loop.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def short_write(state, file):
        file.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(CheckpointWriteError, match="could not write the checkpoint .*unexpected pos") as caught:
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert isinstance(caught.value, OSError)
    assert not os.path.exists(f"{path}.tmp")
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": object()}, path)  # needs pickle to load
    with pytest.raises(ValueError, match="unusable checkpoint .*[Ww]eights only load failed"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint", "truncated", "missing keys"])
def test_unusable_checkpoints_are_a_value_error_naming_the_file(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})
        path.write_bytes(path.read_bytes()[:500])
    elif content == "missing keys":
        save_checkpoint(path, {"step": 1})
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"unusable checkpoint {path}"):
        load_checkpoint(path)


def test_a_signal_during_a_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(state, file):
        file.write(b"partial")
        raise SystemExit(143)

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*ckpt.pt"):
        load_checkpoint(tmp_path / "ckpt.pt")
