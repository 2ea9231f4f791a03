"""A trained model outside its run: the folder ``python -m trainer.export`` writes, and reading it back.

The folder holds three files, none of them pickled:

    model.safetensors   the weights (``safetensors``: a JSON header and raw tensors; the output
                        head is tied to the token embedding and stored once)
    config.json         {"format": "linepack-export", "version": 1, "model": the ModelConfig fields,
                         "stream": the StreamMeta the model trained on, without its "vocab",
                         "step": optimizer steps done, "sample_length": the typical row length or null}
    tokenizer.json      the tokenizer: for a stream with tokenizer "hf", the Hugging Face
                        ``tokenizers`` file itself (``tokenizers.Tokenizer.from_file`` reads it);
                        for "char" and "bytes", {"linepack_tokenizer": "char", "vocab": the
                        characters in id order} ("" for bytes)

Linepack's own ``[MASK]``, ``[SEP]``, ``[PAD]`` ids come after the tokenizer's vocabulary
(``config["stream"]``: ``mask_id``, ``sep_id``, ``pad_id``). Loading in plain PyTorch:

    config = json.load(open("DIR/config.json"))
    model = BidirectionalTransformer(ModelConfig(**config["model"]))
    safetensors.torch.load_model(model, "DIR/model.safetensors")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from shared.meta import StreamMeta
from trainer.model.transformer import BidirectionalTransformer, ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "linepack-export"
VERSION = 1


@dataclass(frozen=True)
class TrainedModel:
    """A trained model ready to use: ``model`` in eval mode, the ``meta`` of the stream it trained
    on (decoding, special ids), its ``step``, the typical ``sample_length`` (None: unknown) and the
    file or folder it came from."""

    model: BidirectionalTransformer
    meta: StreamMeta
    step: int
    sample_length: int | None
    source: str


def is_export(path: str) -> bool:
    """Whether ``path`` is a folder written by :func:`write_export`."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def tokenizer_file(meta: StreamMeta) -> str:
    """The text of ``tokenizer.json`` for ``meta`` (see the module docstring)."""
    if meta.tokenizer == "hf":
        return meta.vocab
    return json.dumps({"linepack_tokenizer": meta.tokenizer, "vocab": meta.vocab}, ensure_ascii=False)


def vocab_from_file(kind: str, text: str) -> str:
    """The meta's ``vocab`` back from ``tokenizer.json``'s text."""
    if kind == "hf":
        return text
    data = json.loads(text)
    if data.get("linepack_tokenizer") != kind or not isinstance(data.get("vocab"), str):
        raise ValueError(f"{TOKENIZER_NAME} is not a Linepack {kind!r} tokenizer")
    return data["vocab"]


def write_export(folder: str, model: BidirectionalTransformer, meta: StreamMeta, step: int, sample_length: int | None) -> None:
    """Write ``model`` and what it needs into ``folder`` (created; files in it are replaced)."""
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_model(model, os.path.join(folder, WEIGHTS_NAME))
    stream = {key: value for key, value in meta.to_dict().items() if key != "vocab"}
    config = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), "stream": stream, "step": step,
              "sample_length": sample_length}
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=1)
    with open(os.path.join(folder, TOKENIZER_NAME), "w", encoding="utf-8") as file:
        file.write(tokenizer_file(meta))


def read_export(folder: str, device: torch.device | str = "cpu") -> TrainedModel:
    """The model (eval mode, on ``device``) of an export folder; ValueError naming the file when
    one is not what :func:`write_export` writes."""
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as file:
            config: dict[str, Any] = json.load(file)
        if config.get("format") != FORMAT or config.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION} config")
        with open(os.path.join(folder, TOKENIZER_NAME), encoding="utf-8") as file:
            vocab = vocab_from_file(config["stream"]["tokenizer"], file.read())
        meta = StreamMeta.from_dict({**config["stream"], "vocab": vocab})
        model = BidirectionalTransformer(ModelConfig(**config["model"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unusable export {path}: {type(error).__name__}: {str(error)[:300]}") from None
    try:
        safetensors.torch.load_model(model, os.path.join(folder, WEIGHTS_NAME), device=str(device))
    except Exception as error:  # SafetensorError, RuntimeError (missing or mis-shaped tensors)
        raise ValueError(f"unusable weights {os.path.join(folder, WEIGHTS_NAME)}: {str(error)[:300]}") from None
    sample_length = config.get("sample_length")
    return TrainedModel(model.to(device).eval(), meta, int(config["step"]), None if sample_length is None else int(sample_length),
                        folder)
