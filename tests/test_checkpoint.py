"""trainer.checkpoint: atomic writes, clean failure, weights-only loading."""

import os

import pytest
import torch

from trainer.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint


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
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": object()}, path)  # needs pickle to load
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_checkpoint(path)


def test_resume_without_a_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*ckpt.pt"):
        load_checkpoint(tmp_path / "ckpt.pt")
