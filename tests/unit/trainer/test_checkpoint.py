"""trainer.loop.checkpoint: atomic writes, clean failure, weights-only loading."""

import os

import pytest
import torch

from trainer.data.orders import Cursor
from trainer.loop.checkpoint import (
    Checkpoint,
    CheckpointWriteError,
    load_checkpoint,
    load_model,
    load_state,
    rng_state,
    save_checkpoint,
    save_state,
)


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_state(path, {"step": 1, "w": torch.ones(3)})

    def short_write(state, file):
        file.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(CheckpointWriteError, match="could not write the checkpoint .*unexpected pos") as caught:
        save_state(path, {"step": 2, "w": torch.zeros(3)})
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
        save_state(path, {"step": 1, "w": torch.ones(1000)})
        path.write_bytes(path.read_bytes()[:500])
    elif content == "missing keys":
        save_state(path, {"step": 1})
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
        save_state(tmp_path / "ckpt.pt", {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*ckpt.pt"):
        load_checkpoint(tmp_path / "ckpt.pt")


def full_state(weights: torch.Tensor) -> dict:
    return {"model": {"w": weights}, "optimizer": {}, "step": 7, "model_config": {}, "train_config": {}, "meta": {},
            "rng": {}}


def test_bytes_flipped_inside_a_stored_tensor_are_caught_by_the_digest(tmp_path):
    """torch.load does not check the zip's CRCs: 64 flipped bytes of weights load silently without the digest."""
    path = tmp_path / "ckpt.pt"
    weights = torch.arange(4096, dtype=torch.float32)
    save_state(path, full_state(weights))
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weights[1000:1004].numpy().tobytes())
    for offset in range(64):
        data[at + offset] ^= 0x55
    path.write_bytes(bytes(data))
    altered = torch.load(path, weights_only=True)["model"]["w"]
    assert not torch.equal(altered, weights), "the flip went into the tensor and torch loads it"
    with pytest.raises(ValueError, match="do not match its digest"):
        load_checkpoint(path)


def test_a_write_out_of_descriptors_is_retried_with_the_reserve(tmp_path, monkeypatch, caplog):
    import errno

    from trainer.loop import checkpoint

    calls = []
    real_write = checkpoint._write

    def exhausted_once(path, state):
        calls.append(path)
        if len(calls) == 1:
            raise checkpoint.CheckpointWriteError("could not write") from OSError(errno.EMFILE, "Too many open files")
        real_write(path, state)

    monkeypatch.setattr(checkpoint, "_write", exhausted_once)
    save_state(tmp_path / "ckpt.pt", full_state(torch.ones(3)))
    assert len(calls) == 2 and load_state(tmp_path / "ckpt.pt")["step"] == 7
    assert "out of file descriptors; retrying" in caplog.text
    def disk_full(path, state):
        calls.append(path)
        raise checkpoint.CheckpointWriteError("could not write") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write", disk_full)
    with pytest.raises(checkpoint.CheckpointWriteError):  # another error is not retried
        save_state(tmp_path / "ckpt.pt", full_state(torch.ones(3)))
    assert len(calls) == 3


def test_nan_weights_are_named_as_such_not_as_an_inverted_mask():
    from trainer.model.selftest import NonFiniteWeightsError, mask_self_test
    from trainer.model.transformer import BidirectionalTransformer, ModelConfig

    from helpers.streams import SyntheticStream

    stream = SyntheticStream(block_size=32)
    model = BidirectionalTransformer(ModelConfig(n_layer=1, n_head=2, n_embd=32).for_stream(stream.meta))
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="not finite .*not the attention mask"):
        mask_self_test(model, stream.batch(), stream.meta)


def test_resume_says_when_the_checkpoint_model_differs_from_the_flags(caplog):
    from trainer.loop.startup import model_config_for
    from trainer.model.transformer import ModelConfig

    from helpers.streams import SyntheticStream

    meta = SyntheticStream(block_size=32).meta
    trained = ModelConfig(n_layer=2, n_head=2, n_embd=32).for_stream(meta)
    checkpoint = Checkpoint(model={}, optimizer={}, step=1, model_config=trained, meta=meta)
    used = model_config_for(checkpoint, ModelConfig(n_layer=4, n_head=2, n_embd=64), meta)
    assert used == trained
    assert "the checkpoint's model is used, not the flags': n_layer 2 (flags: 4), n_embd 32 (flags: 64)" in caplog.text


def small_checkpoint(**overrides) -> Checkpoint:
    from trainer.model.transformer import BidirectionalTransformer, ModelConfig

    from helpers.streams import SyntheticStream

    meta = SyntheticStream(block_size=32).meta
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32).for_stream(meta)
    torch.manual_seed(0)
    model = BidirectionalTransformer(config)
    fields = dict(model=model.state_dict(), optimizer={}, step=5, model_config=config, meta=meta,
                  train_config={"lr": 0.001}, rng=rng_state(), sample_length=20, cursor=Cursor(position=3, rows_used=4))
    return Checkpoint(**{**fields, **overrides})


def test_a_checkpoint_comes_back_typed_and_load_model_rebuilds_the_same_model(tmp_path):
    written = small_checkpoint()
    save_checkpoint(tmp_path / "ckpt.pt", written)
    read = load_checkpoint(tmp_path / "ckpt.pt")
    assert (read.step, read.meta, read.model_config, read.cursor, read.sample_length) == (
        5, written.meta, written.model_config, Cursor(position=3, rows_used=4), 20)
    assert read.train_config == {"lr": 0.001}
    for path in (tmp_path / "ckpt.pt", tmp_path):  # the file, or the run directory holding it
        trained = load_model(path)
        assert not trained.model.training and trained.step == 5 and trained.meta == written.meta
        for name, tensor in written.model.items():
            assert torch.equal(trained.model.state_dict()[name], tensor)


def test_a_checkpoint_with_a_protocol_1_meta_is_upgraded_wherever_it_is_loaded(tmp_path):
    """common_set used to read the meta without the upgrade that resuming does: now one path does both."""
    meta = small_checkpoint().meta
    state = small_checkpoint().to_state()
    state["meta"] = {key: value for key, value in meta.to_dict().items() if key not in ("tokenizer", "tokenizer_digest")}
    save_state(tmp_path / "ckpt.pt", state)
    assert load_checkpoint(tmp_path / "ckpt.pt").meta == meta
    assert load_model(tmp_path).meta == meta


def test_a_checkpoint_whose_fields_do_not_parse_is_a_value_error(tmp_path):
    state = small_checkpoint().to_state()
    state["model_config"] = {**state["model_config"], "n_embd": 33}
    save_state(tmp_path / "ckpt.pt", state)
    with pytest.raises(ValueError, match="unusable checkpoint .*n_embd 33"):
        load_checkpoint(tmp_path / "ckpt.pt")
