"""Hand-built wire messages, no producer needed: valid stream metas and valid wire tensors built
with numpy, their frames, an independent re-check of every invariant a decoded
:class:`shared.wire.WireMessage` must hold, and the byte-level mutations the fuzz tests apply to
frames and recording files. All randomness comes from the generator passed in.

The checker deliberately uses plain per-row Python loops rather than the decoder's
vectorized logic, so that a bug in one is not mirrored in the other.
"""

from __future__ import annotations

import msgpack
import numpy as np

from shared.limits import MAX_PRODUCER_ID_CHARS
from shared.meta import StreamMeta, mixture_fingerprint
from shared.mixture import SourceInfo
from shared.tokenizer import CharTokenizer
from shared.vocab import IGNORE_INDEX
from shared.wire import (
    INCARNATION_HEX,
    KIND_BATCH,
    OPTIONAL_TENSORS,
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    REQUIRED_TENSORS,
    SPLITS,
    TENSOR_RANKS,
    WireError,
    WireMessage,
    decode,
    decode_stream,
    encode,
    encode_meta,
    tensor_dtypes,
)

DEFAULT_CHARS = "\n !',.?abcdefghijklmnopqrstuvwxyz"
BERT = {"policy": "bert", "mask_prob": 0.15, "mask_fractions": [0.8, 0.1, 0.1], "supervise_sep": False}
# Four train and four val stages: a stream whose messages carry the stage tensor.
STAGES = {"policy": "stages", "mask_fractions": [0.8, 0.1, 0.1], "supervise_sep": False,
          "stages": {split: [{"type": "random", "max_masked_ratio": 0.5}] * 4 for split in ("train", "val")}}
INCARNATION = "0123456789abcdef"


def vocab_chars(base_size: int) -> str:
    """``base_size`` sorted distinct characters, starting with printable ASCII."""
    return "".join(chr(c) for c in range(32, 32 + base_size))


def make_meta(
    block_size: int = 16,
    rows_per_message: int = 4,
    chars: str = DEFAULT_CHARS,
    packing: str = "lines",
    val_messages: int = 3,
    seed: int = 0,
    *,
    text: str | None = None,
    corruption: dict | None = None,
    token_counts=None,
    corpus_fingerprint: str = "0123456789abcdef",
    sources: dict[str, float] | None = None,
) -> StreamMeta:
    """A valid meta (random sampling) over ``chars``, bert-corrupted (:data:`BERT`) unless
    ``corruption`` says otherwise.

    The vocabulary's token counts are ``1, 2, ...``; with ``text`` the vocabulary and the counts
    come from that text instead (``chars`` is then unused). ``token_counts`` overrides either.
    ``sources`` (name -> weight) makes it a mixture: each source with those counts times its place (1, 2, ...).
    """
    if text is None:
        vocabulary = CharTokenizer(chars)
        counts = range(1, vocabulary.base_size + 1)
    else:
        vocabulary = CharTokenizer.from_text(text)
        counts = np.bincount(vocabulary.encode(text), minlength=vocabulary.base_size)
    counts = np.asarray(list(counts) if token_counts is None else token_counts, dtype=np.int64)
    mixture = tuple(SourceInfo(name, float(weight), f"{place:016x}", 0, 0, (counts * place).astype("<u8").tobytes())
                    for place, (name, weight) in enumerate((sources or {}).items(), start=1))
    return StreamMeta.build(
        vocabulary,
        BERT if corruption is None else corruption,
        token_counts=counts,
        block_size=block_size,
        rows_per_message=rows_per_message,
        packing=packing,
        sampling="random",
        seed=seed,
        corpus_fingerprint=mixture_fingerprint(mixture) if mixture else corpus_fingerprint,
        val_messages=val_messages,
        sources=mixture,
    )


def make_tensors(
    meta: StreamMeta,
    rows: int,
    rng: np.random.Generator,
    supervise_prob: float = 0.3,
    with_stage: bool = False,
) -> dict[str, np.ndarray]:
    """Valid tensors with ``rows`` rows: random content, ``[SEP]`` then ``[PAD]`` (lines
    packing) or full rows (fixed), BERT-style corruption of a random supervised set; ``stage``
    too for a stages meta (``with_stage`` insists on one)."""
    T, V0 = meta.block_size, meta.base_size
    stages = meta.corruption_config.get("stages")
    assert stages is not None or not with_stage, "the stage tensor belongs to a stages stream (corruption=STAGES)"
    if meta.packing == "lines":
        valid_len = rng.integers(1, T + 1, size=rows)
    else:
        valid_len = np.full(rows, T)
    positions = np.arange(T)[None, :]
    visible = positions < valid_len[:, None]
    original = rng.integers(0, V0, size=(rows, T))
    if meta.packing == "lines":
        original[np.arange(rows), valid_len - 1] = meta.sep_id
    original[~visible] = meta.pad_id
    candidates = visible & (original != meta.sep_id)
    supervised = candidates & (rng.random((rows, T)) < supervise_prob)
    roll = rng.random((rows, T))
    x = original.copy()
    x[supervised & (roll < 0.8)] = meta.mask_id
    random_slots = supervised & (roll >= 0.8) & (roll < 0.9)
    x[random_slots] = rng.integers(0, V0, size=int(random_slots.sum()))
    y = np.where(supervised, original, IGNORE_INDEX)
    n_candidates = np.maximum(candidates.sum(axis=1), 1)
    dtypes = tensor_dtypes(meta)
    tensors = {
        "x": x.astype(dtypes["x"]),
        "y": y.astype(dtypes["y"]),
        "attention_mask": visible.astype("u1"),
        "mask_ratio": (supervised.sum(axis=1) / n_candidates).astype("<f4"),
    }
    if stages is not None:
        tensors["stage"] = rng.integers(0, len(stages["train"]), size=rows).astype("u1")
    if meta.sources:
        tensors["source"] = rng.integers(0, len(meta.sources), size=rows).astype("u1")
    return tensors


def make_frames(meta: StreamMeta, producer_id: str, seq: int, rng: np.random.Generator, rows: int | None = None,
                split: str = "train", index: int = 0) -> list:
    """The frames of one valid batch (``rows`` defaults to ``meta.rows_per_message``); ``index``
    is k for train, the val index for val."""
    tensors = make_tensors(meta, rows or meta.rows_per_message, rng)
    return encode(meta, split, producer_id, seq, tensors, index, incarnation=INCARNATION)


def meta_frames(meta: StreamMeta, producer_id: str = "p", seq: int = 0) -> list[bytes]:
    """The frames of the meta message a producer sends before its batches."""
    return encode_meta(meta, producer_id, seq, incarnation=INCARNATION)


def decode_with(meta: StreamMeta, frames):
    """``shared.wire.decode`` of ``frames`` by a receiver that knows ``meta`` (has its meta message)."""
    return decode(frames, {meta.digest: meta})


def as_bytes(frames) -> list[bytes]:
    """Frames as plain ``bytes`` (what a socket or a recording hands back)."""
    return [bytes(memoryview(frame).cast("B")) for frame in frames]


def assert_valid_message(message: WireMessage) -> None:
    """Re-check, independently of the decoder, everything an accepted message must satisfy."""
    assert isinstance(message, WireMessage)
    meta = message.meta
    assert isinstance(meta, StreamMeta)
    header = msgpack.unpackb(bytes(memoryview(message.frames[0]).cast("B")), raw=False)
    assert header["magic"] == PROTOCOL_MAGIC and header["kind"] == KIND_BATCH
    assert type(header["version"]) is int and header["version"] in (2, PROTOCOL_VERSION)  # a batch is the same in 2 and 3
    assert "meta" not in header and header["meta_hash"] == meta.digest  # batches name their meta by digest
    assert len(header["incarnation"]) == INCARNATION_HEX and header["incarnation"] == message.incarnation
    assert message.split in SPLITS and header["split"] == message.split
    assert type(message.producer_id) is str and 1 <= len(message.producer_id) <= MAX_PRODUCER_ID_CHARS
    assert type(message.seq) is int and message.seq >= 0
    if message.split == "train":
        assert message.val_index == -1
    else:
        assert 0 <= message.val_index < meta.val_messages

    names = set(message.tensors)
    assert set(REQUIRED_TENSORS) <= names <= set(REQUIRED_TENSORS) | set(OPTIONAL_TENSORS)
    assert ("stage" in names) == (meta.corruption_config["policy"] == "stages")
    rows = message.rows
    assert 1 <= rows <= meta.rows_per_message
    T = meta.block_size
    dtypes = tensor_dtypes(meta)
    for name, array in message.tensors.items():
        dtype, rank = dtypes[name], TENSOR_RANKS[name]
        assert array.dtype == dtype, name
        assert array.shape == ((rows, T) if rank == 2 else (rows,)), name
        assert not array.flags.writeable, name

    x = message.tensors["x"].tolist()
    y = message.tensors["y"].tolist()
    mask = message.tensors["attention_mask"].tolist()
    ratio = message.tensors["mask_ratio"].tolist()
    V = meta.vocab_size
    supervise_sep = meta.corruption_config.get("supervise_sep", False)
    for r in range(rows):
        assert all(0 <= token < V for token in x[r])
        assert all(label == IGNORE_INDEX or 0 <= label < V for label in y[r])
        assert 0.0 <= ratio[r] <= 1.0  # NaN fails both comparisons
        assert set(mask[r]) <= {0, 1}
        valid_len = sum(mask[r])
        assert valid_len >= 1
        assert mask[r] == [1] * valid_len + [0] * (T - valid_len)
        assert all(token != meta.pad_id for token in x[r][:valid_len])
        assert all(token == meta.pad_id for token in x[r][valid_len:])
        assert all(label == IGNORE_INDEX for label in y[r][valid_len:])
        if meta.packing == "lines":
            last = valid_len - 1
            original = y[r][last] if y[r][last] != IGNORE_INDEX else x[r][last]
            assert original == meta.sep_id
            candidates = valid_len - 1 + (1 if supervise_sep else 0)
        else:
            assert valid_len == T
            candidates = T
        supervised = sum(label != IGNORE_INDEX for label in y[r])
        assert supervised <= candidates and abs(ratio[r] - supervised / max(candidates, 1)) <= 1e-6


def mutate_bytes(data: bytes, kind: str, position: int, payload: bytes) -> bytes:
    """One byte-level mutation of ``data``; ``position`` is taken modulo its length (+1)."""
    position %= len(data) + 1
    if kind == "flip":
        if not data:
            return payload[:1]
        position %= len(data)
        return data[:position] + bytes([data[position] ^ (payload[0] if payload else 0xFF)]) + data[position + 1:]
    if kind == "insert":
        return data[:position] + payload + data[position:]
    if kind == "delete":
        return data[:position] + data[position + max(1, len(payload)):]
    if kind == "overwrite":
        return data[:position] + payload + data[position + len(payload):]
    if kind == "truncate":
        return data[:position]
    raise AssertionError(kind)


def recorded_batches(records) -> list[WireMessage]:
    """The batches of a recorded stream (its meta messages learnt on the way); every message must decode."""
    messages = list(decode_stream(records))
    errors = [message for message in messages if isinstance(message, WireError)]
    assert not errors, errors[:3]
    return messages
