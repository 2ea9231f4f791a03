"""Hand-built valid wire messages for the streaming tests (no producer needed).

``make_meta`` builds a small :class:`StreamMeta`; ``make_tensors`` builds line-packed,
BERT-corrupted rows that pass every check of ``shared.wire.decode``; ``make_frames``
encodes them. All randomness comes from the generator passed in.
"""

from __future__ import annotations

import time

import numpy as np

from shared.meta import StreamMeta
from shared.vocab import IGNORE_INDEX, Vocabulary
from shared.wire import encode

VOCAB = Vocabulary("\n abcdefghijklmnopqrstuvwxyz")


def make_meta(block_size: int = 32, rows_per_message: int = 4, val_messages: int = 3, seed: int = 0, **overrides) -> StreamMeta:
    """A lines-packed, bert-corrupted stream meta over :data:`VOCAB`; any field can be overridden."""
    fields = dict(
        block_size=block_size,
        rows_per_message=rows_per_message,
        packing="lines",
        sampling="random",
        seed=seed,
        corpus_fingerprint="0123456789abcdef",
        val_messages=val_messages,
    )
    fields.update(overrides)
    vocabulary = fields.pop("vocabulary", VOCAB)
    corruption = fields.pop("corruption", {"policy": "bert", "mask_prob": 0.15, "mask_fractions": [0.8, 0.1, 0.1]})
    token_counts = fields.pop("token_counts", [1] * vocabulary.base_size)
    return StreamMeta.build(vocabulary, corruption, token_counts, **fields)


def make_tensors(meta: StreamMeta, rows: int, rng: np.random.Generator, with_stage: bool = False) -> dict[str, np.ndarray]:
    """``rows`` valid rows with wire dtypes: content, then ``[SEP]``, then ``[PAD]``.

    Each row's content length is uniform in ``1..T-1``; about 30 % of the content is
    supervised, 80/10/10 mask/random/unchanged.
    """
    T = meta.block_size
    base = meta.vocab_size - 3
    valid_len = rng.integers(2, T + 1, size=rows)
    positions = np.arange(T)[None, :]
    visible = positions < valid_len[:, None]
    content = positions < (valid_len - 1)[:, None]
    original = rng.integers(0, base, size=(rows, T))
    original = np.where(content, original, np.where(visible, meta.sep_id, meta.pad_id))
    supervised = content & (rng.random((rows, T)) < 0.3)
    roll = rng.random((rows, T))
    corrupted = np.where(roll < 0.8, meta.mask_id, np.where(roll < 0.9, rng.integers(0, base, size=(rows, T)), original))
    x = np.where(supervised, corrupted, original).astype("<u2")
    y = np.where(supervised, original, IGNORE_INDEX).astype("<i2")
    tensors = {
        "x": x,
        "y": y,
        "attention_mask": visible.astype(np.uint8),
        "mask_ratio": (supervised.sum(1) / content.sum(1)).astype("<f4"),
    }
    if with_stage:
        tensors["stage"] = rng.integers(0, 3, size=rows).astype(np.uint8)
    return tensors


def make_frames(meta: StreamMeta, producer_id: str, seq: int, rng: np.random.Generator, rows: int | None = None, split: str = "train", val_index: int = -1) -> list:
    """The frames of one valid message (``rows`` defaults to ``meta.rows_per_message``)."""
    tensors = make_tensors(meta, rows or meta.rows_per_message, rng)
    return encode(meta, split, producer_id, seq, tensors, val_index=val_index)


def as_bytes(frames) -> list[bytes]:
    """Frames as plain ``bytes`` (what a socket or a recording hands back)."""
    return [bytes(memoryview(frame).cast("B")) for frame in frames]


def wait_until(predicate, timeout: float = 10.0) -> None:
    """Polls ``predicate`` every 10 ms; AssertionError when it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
