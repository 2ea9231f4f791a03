"""The wire format: one msgpack header frame, then one raw frame per tensor (docs/SPEC.md §3).

``encode`` builds the frames of a message without copying tensor data; ``decode`` checks
everything (frame count, header schema, dtypes, shapes, buffer sizes, id ranges, row
layout) before it returns a :class:`WireMessage` whose arrays are read-only views of the
received frames, and raises :class:`WireError` with a short ``reason`` code otherwise.
Nothing received is ever unpickled or evaluated. ``docs/PROTOCOL.md`` is the prose form.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np

from shared.limits import MAX_PRODUCER_ID_CHARS
from shared.meta import MetaError, StreamMeta

PROTOCOL_MAGIC = "linepack"
PROTOCOL_VERSION = 1
KIND_BATCH = "batch"
SPLITS = ("train", "val")

MAX_HEADER_BYTES = 1 << 20

# name -> (wire dtype, rank). Rank 2 tensors are (rows, block_size); rank 1 are (rows,).
TENSOR_SPECS: Mapping[str, tuple[np.dtype, int]] = MappingProxyType(
    {
        "x": (np.dtype("<u2"), 2),
        "y": (np.dtype("<i2"), 2),
        "attention_mask": (np.dtype("u1"), 2),
        "mask_ratio": (np.dtype("<f4"), 1),
        "stage": (np.dtype("u1"), 1),
    }
)
REQUIRED_TENSORS = ("x", "y", "attention_mask", "mask_ratio")
OPTIONAL_TENSORS = ("stage",)

# Rejection reasons: every WireError carries exactly one of these.
REASONS = (
    "frame_count",
    "header_size",
    "header_not_msgpack",
    "header_schema",
    "version",
    "meta",
    "tensor_list",
    "dtype",
    "shape",
    "size",
    "value_range",
    "layout",
)


class WireError(ValueError):
    """A message was rejected. ``reason`` is one of :data:`REASONS`; ``detail`` says why;
    ``producer_id`` is the header's producer id when the header got far enough to have a valid
    one (else None), so that rejects can be counted per producer."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.producer_id: str | None = None


@dataclass(frozen=True)
class WireMessage:
    """A decoded, validated message.

    Attributes:
        split: ``train`` or ``val``.
        producer_id: the sender's id (unique per producer process).
        seq: the sender's per-producer sequence number, 0, 1, 2, ... over all its messages.
        val_index: index of this message in the fixed val set, or -1 for train messages.
        meta: the stream meta the message was made under.
        tensors: name -> read-only array view of the frame: ``x`` uint16 (R, T),
            ``y`` int16 (R, T), ``attention_mask`` uint8 (R, T), ``mask_ratio`` float32 (R,),
            and ``stage`` uint8 (R,) when the stages policy is used.
        valid_len: int64 (R,), real tokens per row ([SEP] included), found while checking the layout.
        frames: the exact frames received (header first), for recording.
    """

    split: str
    producer_id: str
    seq: int
    val_index: int
    meta: StreamMeta
    tensors: Mapping[str, np.ndarray]
    valid_len: np.ndarray
    frames: tuple[Any, ...]

    @property
    def rows(self) -> int:
        return int(self.tensors["x"].shape[0])

    def frame_bytes(self) -> list[bytes]:
        """The frames as ``bytes`` (a copy), e.g. to write them to a recording."""
        return [bytes(_buffer(frame)) for frame in self.frames]


def encode(
    meta: StreamMeta,
    split: str,
    producer_id: str,
    seq: int,
    tensors: Mapping[str, np.ndarray],
    val_index: int = -1,
) -> list[Any]:
    """Frames of one message: ``[header bytes, tensor buffer, ...]``, tensor data not copied.

    ``tensors`` must hold the required names with the wire dtypes of :data:`TENSOR_SPECS`
    (C-contiguous arrays; a non-contiguous one is made contiguous). Send with
    ``socket.send_multipart(frames, copy=False)``.
    """
    arrays = []
    descriptors = []
    for name, array in tensors.items():
        wire_dtype, _ = TENSOR_SPECS[name]
        if array.dtype != wire_dtype:
            raise TypeError(f"tensor {name} has dtype {array.dtype}, the wire needs {wire_dtype}")
        array = np.ascontiguousarray(array)
        arrays.append(array)
        descriptors.append({"name": name, "dtype": wire_dtype.str, "shape": list(array.shape)})
    header = {
        "magic": PROTOCOL_MAGIC,
        "version": PROTOCOL_VERSION,
        "kind": KIND_BATCH,
        "split": split,
        "producer": producer_id,
        "seq": int(seq),
        "val_index": int(val_index),
        "meta_hash": meta.digest,
        "meta": meta.to_dict(),
        "tensors": descriptors,
    }
    return [msgpack.packb(header, use_bin_type=True), *arrays]


def _buffer(frame: Any) -> memoryview:
    """A flat byte view of a frame (bytes, bytearray, memoryview, numpy array or zmq.Frame)."""
    view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _show(value: Any) -> str:
    """A short repr of a received value for an error message; bounded in length and nesting depth."""
    return reprlib.repr(value)


def _unpack_header(raw: memoryview) -> dict:
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError("header_size", f"header frame is {len(raw)} bytes, the limit is {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=1 << 17,
            max_map_len=64,
        )
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise WireError("header_not_msgpack", f"frame 0 is not a msgpack header ({type(error).__name__}: {error})") from None
    if not isinstance(header, dict):
        raise WireError("header_schema", f"header is a {type(header).__name__}, not a map")
    return header


def _field(header: dict, name: str, kind: type) -> Any:
    value = header.get(name)
    if type(value) is not kind:
        raise WireError("header_schema", f"header field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


# digest -> (meta, its wire form): a message repeating a known meta skips parsing it again.
_META_CACHE: dict[str, tuple[StreamMeta, dict]] = {}


def _meta_of(header: dict) -> StreamMeta:
    digest = _field(header, "meta_hash", str)
    meta_dict = header.get("meta")
    cached = _META_CACHE.get(digest)
    if cached is not None and _same_wire_form(meta_dict, cached[1]):
        return cached[0]
    try:
        meta = StreamMeta.from_dict(meta_dict)
    except MetaError as error:
        raise WireError("meta", str(error)) from None
    if meta.digest != digest:
        raise WireError("meta", f"meta_hash {digest!r} does not match the meta ({meta.digest!r})")
    if len(_META_CACHE) < 64:
        _META_CACHE[digest] = (meta, meta.to_dict())
    return meta


def _same_wire_form(received: Any, known: dict) -> bool:
    """``received == known`` with the same types throughout (``==`` alone takes 1.0 and True for 1)."""
    return (
        received == known
        and all(type(received[name]) is type(value) for name, value in known.items())
        and set(map(type, received["token_counts"])) <= {int}
    )


def decode(frames: Sequence[Any]) -> WireMessage:
    """Validate and decode the frames of one message; raises :class:`WireError`."""
    if not 1 + len(REQUIRED_TENSORS) <= len(frames) <= 1 + len(TENSOR_SPECS):
        raise WireError("frame_count", f"{len(frames)} frames, expected {1 + len(REQUIRED_TENSORS)} to {1 + len(TENSOR_SPECS)}")
    header = _unpack_header(_buffer(frames[0]))
    if header.get("magic") != PROTOCOL_MAGIC:
        raise WireError("header_schema", f"magic is {_show(header.get('magic'))}, expected {PROTOCOL_MAGIC!r}")
    version = header.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError("version", f"protocol version {_show(version)}, this side speaks {PROTOCOL_VERSION}")
    if header.get("kind") != KIND_BATCH:
        raise WireError("header_schema", f"message kind {_show(header.get('kind'))} is not {KIND_BATCH!r}")
    split = _field(header, "split", str)
    if split not in SPLITS:
        raise WireError("header_schema", f"split {_show(split)} is not one of {SPLITS}")
    producer_id = _field(header, "producer", str)
    if not 0 < len(producer_id) <= MAX_PRODUCER_ID_CHARS:
        raise WireError("header_schema", f"producer id must have 1..{MAX_PRODUCER_ID_CHARS} characters")
    try:
        return _decode_body(frames, header, split, producer_id)
    except WireError as error:
        error.producer_id = producer_id
        raise


def _decode_body(frames: Sequence[Any], header: dict, split: str, producer_id: str) -> WireMessage:
    """The rest of :func:`decode`, once the header names a valid producer."""
    seq = _field(header, "seq", int)
    val_index = _field(header, "val_index", int)
    if seq < 0:
        raise WireError("header_schema", f"seq {seq} is negative")
    meta = _meta_of(header)
    if split == "val" and not 0 <= val_index < meta.val_messages:
        raise WireError("header_schema", f"val_index {val_index} is outside the val set of {meta.val_messages} messages")
    if split == "train" and val_index != -1:
        raise WireError("header_schema", f"a train message has val_index {val_index}, expected -1")

    descriptors = _field(header, "tensors", list)
    if len(descriptors) != len(frames) - 1:
        raise WireError("frame_count", f"header lists {len(descriptors)} tensors but {len(frames) - 1} tensor frames came")
    names = [d.get("name") if isinstance(d, dict) and type(d.get("name")) is str else None for d in descriptors]
    wanted = set(REQUIRED_TENSORS) | (set(OPTIONAL_TENSORS) & set(names))
    if sorted(map(str, names)) != sorted(wanted) or len(set(names)) != len(names):
        raise WireError("tensor_list",
                        f"tensors {_show(names)}, expected {sorted(REQUIRED_TENSORS)} plus optionally {list(OPTIONAL_TENSORS)}")

    rows = None
    tensors: dict[str, np.ndarray] = {}
    for descriptor, frame in zip(descriptors, frames[1:]):
        name = descriptor["name"]
        wire_dtype, rank = TENSOR_SPECS[name]
        if descriptor.get("dtype") != wire_dtype.str:
            raise WireError("dtype", f"tensor {name} has dtype {_show(descriptor.get('dtype'))}, expected {wire_dtype.str!r}")
        shape = descriptor.get("shape")
        if not isinstance(shape, list) or len(shape) != rank or not all(type(n) is int for n in shape):
            raise WireError("shape", f"tensor {name} shape {_show(shape)} is not a list of {rank} integers")
        if rows is None:
            rows = shape[0]
            if not 1 <= rows <= meta.rows_per_message:
                raise WireError("shape", f"tensor {name} has {rows} rows, expected 1..{meta.rows_per_message}")
        expected_shape = [rows, meta.block_size][:rank]
        if shape != expected_shape:
            raise WireError("shape", f"tensor {name} has shape {shape}, expected {expected_shape}")
        buffer = _buffer(frame)
        expected_bytes = wire_dtype.itemsize * math.prod(shape)
        if len(buffer) != expected_bytes:
            raise WireError("size", f"tensor {name} frame has {len(buffer)} bytes, its shape needs {expected_bytes}")
        tensor = np.frombuffer(buffer, dtype=wire_dtype).reshape(shape)
        tensor.flags.writeable = False  # also when the frames themselves are writable
        tensors[name] = tensor

    valid_len = _check_values(tensors, meta)
    return WireMessage(split, producer_id, seq, val_index, meta, MappingProxyType(tensors), valid_len, tuple(frames))


def _check_values(tensors: Mapping[str, np.ndarray], meta: StreamMeta) -> np.ndarray:
    """Raises WireError unless every value and the row layout are valid; returns ``valid_len``."""
    x, y, mask = tensors["x"], tensors["y"], tensors["attention_mask"]
    if int(x.max()) >= meta.vocab_size:
        raise WireError("value_range", f"x holds id {int(x.max())} >= vocab_size {meta.vocab_size}")
    labelled = y != meta.ignore_index
    # ignore_index is negative, so "every label is ignore_index or in 0..V-1" needs no gather.
    if int(y.max()) >= meta.vocab_size or ((y < 0) & labelled).any():
        raise WireError("value_range", f"y holds labels outside 0..{meta.vocab_size - 1} and {meta.ignore_index}")
    if int(mask.max()) > 1:
        raise WireError("value_range", f"attention_mask holds {int(mask.max())}; only 0 and 1 are allowed")
    ratio = tensors["mask_ratio"]
    # min/max propagate NaN, and NaN fails both comparisons; +-inf fails one of them.
    if not (ratio.min() >= 0 and ratio.max() <= 1):
        raise WireError("value_range", "mask_ratio must be finite and within [0, 1]")
    # Row layout (docs/SPEC.md §2.3): attention_mask is a prefix of ones ending at [SEP]; [PAD]
    # fills exactly the positions after it, which are never supervised.
    visible = mask.view(np.bool_)  # exact: every value is 0 or 1 (checked above)
    rows = np.arange(x.shape[0])
    first_zero = visible.argmin(axis=1)  # 0 in a row without zeros
    valid_len = np.where(visible[rows, first_zero], mask.shape[1], first_zero)
    # Row r holds ones at 0..valid_len[r]-1 by construction; it is a prefix iff there are no others.
    if int(valid_len.sum()) != np.count_nonzero(visible):
        raise WireError("layout", "attention_mask is not a prefix of ones in every row")
    if not valid_len.all():
        raise WireError("layout", "a row has no visible token")
    if not ((x == meta.pad_id) != visible).all():
        raise WireError("layout", "[PAD] must fill exactly the positions where attention_mask is 0")
    if (labelled > visible).any():
        raise WireError("layout", "a position after [SEP] is supervised")
    if meta.packing == "lines":
        last_visible = valid_len - 1
        original_last = np.where(labelled[rows, last_visible], y[rows, last_visible], x[rows, last_visible])
        if (original_last != meta.sep_id).any():
            raise WireError("layout", "the last visible token of a row is not [SEP]")
    elif valid_len.min() != mask.shape[1]:
        raise WireError("layout", "fixed packing must have attention_mask all ones")
    return valid_len.astype(np.int64)
