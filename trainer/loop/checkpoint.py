"""Checkpoints: written atomically, verified by a digest, read back with ``torch.load(weights_only=True)``.

Between modules a checkpoint is a :class:`Checkpoint` (typed fields); :func:`load_model` is the
one way to get a trained model back, from a run's checkpoint or an exported folder
(``trainer.model.exported``). On disk it is a dict of tensors and plain Python values only (no
pickled classes), so it loads with ``weights_only=True``:

    model         the model's state_dict
    optimizer     the optimizer's state_dict
    step          optimizer steps done (int)
    model_config  ModelConfig as a dict
    train_config  TrainConfig as a dict
    meta          the StreamMeta the model was trained on, as a dict
    rng           {"cpu": ByteTensor, "cuda": [ByteTensor, ...]}: torch's generator states
    sample_length the median real length of the val rows, for trainer.sample's default
    cursor        the data schedule's cursor after the batch of this step (``trainer.data.orders.Cursor``
                  as a dict): ``--resume`` continues the data exactly there
    digest        SHA-256 of everything above (:func:`state_digest`), checked on load: a changed
                  byte anywhere in a tensor or a value makes the checkpoint unusable, not silently wrong

A write that fails for lack of file descriptors is retried with the reserved ones (``trainer.runtime.fds``);
the training loop skips a checkpoint that still cannot be written (the next evaluation writes one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.meta import StreamMeta
from trainer.data.orders import Cursor
from trainer.model import exported
from trainer.model.exported import TrainedModel
from trainer.model.transformer import BidirectionalTransformer, ModelConfig
from trainer.runtime.fds import retry_out_of_descriptors

CHECKPOINT_NAME = "ckpt.pt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission...)."""


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 over every key, tensor (dtype, shape, bytes) and plain value of ``state``, in order."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in value:
                digest.update(json.dumps(key, default=str).encode())
                add(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                add(item)
            digest.update(b"]")
        else:
            digest.update(json.dumps(value, default=str).encode())

    add({key: value for key, value in state.items() if key != "digest"})
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds (the module docstring lists the on-disk keys).

    ``model`` and ``optimizer`` are the state_dicts; ``train_config`` is the ``TrainConfig`` it
    trained with as a plain record (``dataclasses.asdict``: read, never rebuilt, so a checkpoint
    outlives a renamed flag); ``rng`` is :func:`rng_state`; ``sample_length`` the median real
    length of the val rows (None in old checkpoints); ``cursor`` the data schedule's cursor after
    the batch of ``step`` (None in checkpoints written before the schedule existed).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    model_config: ModelConfig
    meta: StreamMeta
    train_config: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    sample_length: int | None = None
    cursor: Cursor | None = None

    def to_state(self) -> dict[str, Any]:
        """The plain dict written to disk (no digest)."""
        state = {"model": self.model, "optimizer": self.optimizer, "step": self.step,
                 "model_config": self.model_config.to_dict(), "train_config": self.train_config,
                 "meta": self.meta.to_dict(), "rng": self.rng}
        if self.sample_length is not None:
            state["sample_length"] = self.sample_length
        if self.cursor is not None:
            state["cursor"] = self.cursor.to_dict()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], path: str | os.PathLike = "the checkpoint") -> Checkpoint:
        """The typed form of a loaded dict; ValueError naming ``path`` when a field does not parse.
        A protocol-1 meta (characters only, before the tokenizer fields) is upgraded."""
        try:
            return cls(model=state["model"], optimizer=state["optimizer"], step=int(state["step"]),
                       model_config=ModelConfig(**state["model_config"]), meta=checkpoint_meta(state["meta"]),
                       train_config=dict(state["train_config"]), rng=state["rng"],
                       sample_length=None if state.get("sample_length") is None else int(state["sample_length"]),
                       cursor=Cursor.from_dict(state["cursor"]) if "cursor" in state else None)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"unusable checkpoint {path}: {type(error).__name__}: {str(error)[:300]}") from None

    def build_model(self, device: torch.device | str = "cpu") -> BidirectionalTransformer:
        """The model with these weights, on ``device``, in eval mode."""
        model = BidirectionalTransformer(self.model_config)
        model.load_state_dict(self.model)
        return model.to(device).eval()


def checkpoint_meta(data: dict[str, Any]) -> StreamMeta:
    """The stream meta a checkpoint was trained on (one written before the tokenizer fields too)."""
    return StreamMeta.from_v1_dict(data) if "tokenizer" not in data else StreamMeta.from_dict(data)


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically (:func:`save_state`)."""
    save_state(path, checkpoint.to_state())


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` and its digest to ``path`` atomically: a temporary file, fsync, then ``os.replace``.

    A reader (or a crash) sees either the previous checkpoint or the new one, never a torn file.
    Raises :class:`CheckpointWriteError` (an OSError) when it cannot be written, e.g. a full
    disk; the temporary file is removed and the previous checkpoint stays as it was.
    """
    state = {**state, "digest": state_digest(state)}
    retry_out_of_descriptors(lambda: _write(os.fspath(path), state), "writing the checkpoint")


def _write(path: str, state: dict[str, Any]) -> None:
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # also SystemExit from a SIGTERM mid-save: no stray temporary file
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(error, (OSError, RuntimeError)):  # torch.save reports a short write as RuntimeError
            raise CheckpointWriteError(f"could not write the checkpoint {path} ({type(error).__name__}: {error}); "
                                       f"the previous one, if any, is unchanged") from error
        raise
    with contextlib.suppress(OSError):  # the new file is in place; this only hastens the rename to the disk
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


CHECKPOINT_KEYS = ("model", "optimizer", "step", "model_config", "train_config", "meta", "rng", "digest")


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; tensors land on ``device``.

    Raises FileNotFoundError when there is none, ValueError when the file is not a readable
    checkpoint of this format (garbage, truncated, pickled objects, missing keys, a digest that
    does not match, a field that does not parse).
    """
    return Checkpoint.from_state(load_state(path, device), path)


def load_state(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The dict :func:`save_state` wrote, its keys and digest checked (see :func:`load_checkpoint`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (torn zip), ...: all mean "unusable"
        raise ValueError(f"unusable checkpoint {path}: {type(error).__name__}: {str(error)[:300]}") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"unusable checkpoint {path}: missing {missing}")
    if state["digest"] != state_digest(state):
        raise ValueError(f"unusable checkpoint {path}: its contents do not match its digest (the file was changed or damaged)")
    return state


def rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA generator states (dropout draws from them)."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        # A checkpoint from a host with more GPUs has more states than there are devices here.
        for device, generator_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state.cpu(), device)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> TrainedModel:
    """The model at ``path``: a checkpoint file, a run directory (its ``ckpt.pt``) or a folder
    written by ``python -m trainer.export``. FileNotFoundError / ValueError when there is none or
    it is unusable."""
    path = os.fspath(path)
    if exported.is_export(path):
        return exported.read_export(path, device)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    checkpoint = load_checkpoint(path, device)
    return TrainedModel(checkpoint.build_model(device), checkpoint.meta, checkpoint.step, checkpoint.sample_length, path)
