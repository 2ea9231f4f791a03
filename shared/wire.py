"""The wire format (docs/SPEC.md §3, docs/PROTOCOL.md): one msgpack header frame, then raw frames.

Four kinds of message travel on a stream's connection (protocol version 3):

- ``meta`` (producer to trainer): the stream meta (frame 1, a msgpack map; the unigram counts one
  binary of uint64), sent by a producer first on every connection and again every few seconds,
  which announces it to the trainer and keeps it known;
- ``batch`` (producer to trainer): message ``index`` of its split (train: k of the schedule; val:
  the val index), rows of ``x`` / ``y`` / ``attention_mask`` / ``mask_ratio`` (/ ``stage``, / ``source``), one
  raw frame per tensor; its header names the meta by digest only (``meta_hash``);
- ``order`` and ``refuse`` (trainer to producer, :class:`Order`, :class:`Refusal`): what to compute
  and send, and why a producer's stream is turned away (:func:`encode_order`,
  :func:`encode_refusal`, :func:`decode_control`).

``encode`` / ``encode_meta`` build the frames without copying tensor data. ``decode(frames,
metas)`` checks everything (frame count, header schema, dtypes, shapes, buffer sizes, id
ranges, row layout) before it returns a :class:`WireMessage` (whose arrays are read-only views
of the received frames) or a :class:`MetaMessage`, and raises :class:`WireError` with a short
``reason`` code otherwise; a batch whose digest is not in ``metas`` raises :class:`UnknownMeta`.
Protocol version 1 and 2 messages (1: the meta inline in every header, characters only; 2: no
schedule index, the counts a list), as old recordings hold them, are still decoded. Nothing received is ever unpickled or evaluated.
"""

from __future__ import annotations

import hashlib
import math
import reprlib
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np

from shared.digest import short_sha256
from shared.limits import MAX_PRODUCER_ID_CHARS
from shared.meta import MetaError, StreamMeta, canonical_json
from shared.mixture import SOURCE_DTYPE
from shared.vocab import id_dtype, label_dtype

PROTOCOL_MAGIC = "linepack"
PROTOCOL_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
KIND_BATCH = "batch"
KIND_META = "meta"
KIND_ORDER = "order"  # trainer -> producer: compute and send these messages
KIND_REFUSE = "refuse"  # trainer -> producer: your stream is not this trainer's
SPLITS = ("train", "val")
MAX_ORDER_COUNT = 1 << 16  # messages one order may ask for
MAX_REFUSAL_CHARS = 1024

MAX_HEADER_BYTES = 1 << 20
# A meta frame: the tokenizer JSON and 8 bytes of counts per base id. A 1M-token BPE is about
# 24 MiB of JSON and 8 MiB of counts (docs/SECURITY.md).
MAX_META_BYTES = 48 << 20
MAX_V2_META_COUNTS = 1 << 21  # token_counts entries of a protocol-2 meta frame (a msgpack array)
META_CACHE_BYTES = 64 << 20  # the decoder's cache of metas, by StreamMeta.nbytes ...
META_CACHE_SIZE = 16  # ... and by number
MAX_HEADER_ENTRIES = 64  # msgpack maps and arrays in a header (shapes, the tensor list)
INCARNATION_HEX = 16

# name -> rank; rank 2 tensors are (rows, block_size), rank 1 are (rows,). Dtypes: tensor_dtypes().
TENSOR_RANKS: Mapping[str, int] = MappingProxyType({"x": 2, "y": 2, "attention_mask": 2, "mask_ratio": 1, "stage": 1,
                                                   "source": 1})
REQUIRED_TENSORS = ("x", "y", "attention_mask", "mask_ratio")
OPTIONAL_TENSORS = ("stage", "source")  # stage: a stages stream; source: a mixture (meta.sources)
HEADER_KEYS = MappingProxyType({
    (3, KIND_BATCH): frozenset({"magic", "version", "kind", "split", "producer", "incarnation", "seq", "index",
                                "meta_hash", "tensors"}),
    (3, KIND_META): frozenset({"magic", "version", "kind", "producer", "incarnation", "seq", "meta_hash"}),
    (2, KIND_BATCH): frozenset({"magic", "version", "kind", "split", "producer", "incarnation", "seq", "val_index",
                                "meta_hash", "tensors"}),
    (2, KIND_META): frozenset({"magic", "version", "kind", "producer", "incarnation", "seq", "meta_hash"}),
    (1, KIND_BATCH): frozenset({"magic", "version", "kind", "split", "producer", "seq", "val_index", "meta_hash", "meta",
                                "tensors"}),
})

# Rejection reasons: every WireError carries exactly one of these.
REASONS = (
    "frame_count", "header_size", "header_not_msgpack", "header_schema", "version", "meta", "meta_unknown",
    "tensor_list", "dtype", "shape", "size", "value_range", "layout",
)


def tensor_dtypes(meta: StreamMeta) -> dict[str, np.dtype]:
    """The wire dtype of each tensor of a stream: ids and labels as small as its vocabulary allows."""
    return {"x": id_dtype(meta.vocab_size), "y": label_dtype(meta.vocab_size), "attention_mask": np.dtype("u1"),
            "mask_ratio": np.dtype("<f4"), "stage": np.dtype("u1"), "source": SOURCE_DTYPE}


def new_incarnation() -> str:
    """A random id for one run of a producer process: a restart with the same producer id is a new sequence."""
    return secrets.token_hex(INCARNATION_HEX // 2)


class WireError(ValueError):
    """A message was rejected. ``reason`` is one of :data:`REASONS`; ``detail`` says why;
    ``producer_id`` is the header's producer id when the header got far enough to have a valid
    one (else None), so that rejects can be counted per producer; ``incarnation`` and ``seq``
    likewise (else None), so that a rejected message still advances its producer's sequence
    accounting (it was sent and received: it is no gap)."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.producer_id: str | None = None
        self.incarnation: str | None = None
        self.seq: int | None = None


class UnknownMeta(WireError):
    """A valid batch header names a meta digest the receiver has no full meta for (yet)."""

    def __init__(self, digest: str) -> None:
        super().__init__("meta_unknown", f"no meta message with digest {digest!r} has been received")
        self.digest = digest


@dataclass(frozen=True)
class WireMessage:
    """A decoded, validated batch.

    Attributes:
        split: ``train`` or ``val``.
        producer_id: the sender's id; ``incarnation``: its process run ("" for protocol 1).
        seq: the sender's sequence number within its incarnation, 0, 1, 2, ... over all its messages.
        index: the message's index in its split: k, its place in the train schedule (docs/SPEC.md
            §2.6), for train; its place in the fixed val set for val. -1 for a train message of
            protocol 1 or 2, which had no schedule.
        meta: the stream meta the message was made under.
        tensors: name -> read-only array view of the frame: ``x`` uint16/uint32 (R, T),
            ``y`` int16/int32 (R, T), ``attention_mask`` uint8 (R, T), ``mask_ratio`` float32 (R,),
            ``stage`` uint8 (R,) when the stages policy is used, and ``source`` uint8 (R,) (each
            row's index into ``meta.sources``) for a mixture.
        valid_len: int64 (R,), real tokens per row ([SEP] included), found while checking the layout.
        frames: the exact frames received (header first), for recording.
    """

    split: str
    producer_id: str
    incarnation: str
    seq: int
    index: int
    meta: StreamMeta
    tensors: Mapping[str, np.ndarray]
    valid_len: np.ndarray
    frames: tuple[Any, ...]

    @property
    def rows(self) -> int:
        return int(self.tensors["x"].shape[0])

    @property
    def val_index(self) -> int:
        """The index in the fixed val set, or -1 for a train message."""
        return self.index if self.split == "val" else -1


@dataclass(frozen=True)
class MetaMessage:
    """A decoded, validated meta message: the full meta of the stream a producer sends."""

    producer_id: str
    incarnation: str
    seq: int
    meta: StreamMeta
    frames: tuple[Any, ...]


def encode(meta: StreamMeta, split: str, producer_id: str, seq: int, tensors: Mapping[str, np.ndarray],
           index: int, incarnation: str = "0" * INCARNATION_HEX) -> list[Any]:
    """Frames of one batch: ``[header bytes, tensor buffer, ...]``, tensor data not copied.
    ``index``: k for a train message, the val index for a val message.

    ``tensors`` must hold the required names with the dtypes of :func:`tensor_dtypes` (C-contiguous
    arrays; a non-contiguous one is made contiguous). Send with ``send_multipart(frames, copy=False)``.
    """
    dtypes = tensor_dtypes(meta)
    arrays, descriptors = [], []
    for name, array in tensors.items():
        if array.dtype != dtypes[name]:
            raise TypeError(f"tensor {name} has dtype {array.dtype}, the wire needs {dtypes[name]}")
        array = np.ascontiguousarray(array)
        arrays.append(array)
        descriptors.append({"name": name, "dtype": dtypes[name].str, "shape": list(array.shape)})
    header = {"magic": PROTOCOL_MAGIC, "version": PROTOCOL_VERSION, "kind": KIND_BATCH, "split": split,
              "producer": producer_id, "incarnation": incarnation, "seq": int(seq), "index": int(index),
              "meta_hash": meta.digest, "tensors": descriptors}
    return [msgpack.packb(header, use_bin_type=True), *arrays]


def encode_meta(meta: StreamMeta, producer_id: str, seq: int, incarnation: str = "0" * INCARNATION_HEX) -> list[bytes]:
    """Frames of one meta message: ``[header, msgpack of meta.to_wire()]`` (the counts as one bin value)."""
    header = {"magic": PROTOCOL_MAGIC, "version": PROTOCOL_VERSION, "kind": KIND_META, "producer": producer_id,
              "incarnation": incarnation, "seq": int(seq), "meta_hash": meta.digest}
    return [msgpack.packb(header, use_bin_type=True), msgpack.packb(meta.to_wire(), use_bin_type=True)]


@dataclass(frozen=True)
class Order:
    """Trainer to producer: compute messages ``start .. start + count - 1`` of ``split`` (train:
    schedule indices k; val: val indices) and send them, in that order, on this connection.
    ``trainer`` is the ordering trainer's incarnation (16 hex digits, new per trainer process)."""

    trainer: str
    split: str
    start: int
    count: int


@dataclass(frozen=True)
class Refusal:
    """Trainer to producer: the producer's messages are refused (``reason`` is a rejection
    reason of docs/PROTOCOL.md §5, e.g. ``meta_mismatch``; ``detail`` says why, for its log)."""

    trainer: str
    reason: str
    detail: str


def encode_order(order: Order) -> list[bytes]:
    """The one frame of an order message."""
    header = {"magic": PROTOCOL_MAGIC, "version": PROTOCOL_VERSION, "kind": KIND_ORDER, "trainer": order.trainer,
              "split": order.split, "start": int(order.start), "count": int(order.count)}
    return [msgpack.packb(header, use_bin_type=True)]


def encode_refusal(refusal: Refusal) -> list[bytes]:
    """The one frame of a refusal message (``detail`` cut to :data:`MAX_REFUSAL_CHARS`)."""
    header = {"magic": PROTOCOL_MAGIC, "version": PROTOCOL_VERSION, "kind": KIND_REFUSE, "trainer": refusal.trainer,
              "reason": refusal.reason, "detail": refusal.detail[:MAX_REFUSAL_CHARS]}
    return [msgpack.packb(header, use_bin_type=True)]


CONTROL_KEYS = MappingProxyType({
    KIND_ORDER: frozenset({"magic", "version", "kind", "trainer", "split", "start", "count"}),
    KIND_REFUSE: frozenset({"magic", "version", "kind", "trainer", "reason", "detail"}),
})


def decode_control(frames: Sequence[Any]) -> Order | Refusal:
    """Validate and decode a trainer-to-producer message; raises :class:`WireError`."""
    if len(frames) != 1:
        raise WireError("frame_count", f"a control message has 1 frame, not {len(frames)}")
    header = unpack_map(_buffer(frames[0]), MAX_HEADER_BYTES, MAX_HEADER_ENTRIES, "frame 0")
    if header.get("magic") != PROTOCOL_MAGIC:
        raise WireError("header_schema", f"magic is {_show(header.get('magic'))}, expected {PROTOCOL_MAGIC!r}")
    if header.get("version") != PROTOCOL_VERSION or type(header.get("version")) is not int:
        raise WireError("version", f"control messages are protocol {PROTOCOL_VERSION}, not {_show(header.get('version'))}")
    kind = header.get("kind")
    keys = CONTROL_KEYS.get(kind) if type(kind) is str else None
    if keys is None or set(header) != keys:
        raise WireError("header_schema", f"not an order or refusal: kind {_show(kind)}, keys {_show(sorted(map(str, header)))}")
    trainer = _field(header, "trainer", str)
    if len(trainer) != INCARNATION_HEX or not all(c in "0123456789abcdef" for c in trainer):
        raise WireError("header_schema", f"trainer must be {INCARNATION_HEX} lowercase hex digits")
    if kind == KIND_REFUSE:
        return Refusal(trainer, _field(header, "reason", str)[:MAX_REFUSAL_CHARS], _field(header, "detail", str)[:MAX_REFUSAL_CHARS])
    split, start, count = _field(header, "split", str), _field(header, "start", int), _field(header, "count", int)
    if split not in SPLITS or not 0 <= start < 1 << 62 or not 1 <= count <= MAX_ORDER_COUNT:
        raise WireError("header_schema", f"order {split!r} {start}+{count} is outside the splits or ranges")
    return Order(trainer, split, start, count)


def _buffer(frame: Any) -> memoryview:
    """A flat byte view of a frame (bytes, bytearray, memoryview, numpy array or zmq.Frame)."""
    view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def frame_bytes(frames: Sequence[Any]) -> list[bytes]:
    """The frames as ``bytes`` (a copy), e.g. to write them to a recording."""
    return [bytes(_buffer(frame)) for frame in frames]


def _show(value: Any) -> str:
    """A short repr of a received value for an error message; bounded in length and nesting depth."""
    return reprlib.repr(value)


def _pairs(pairs: list[tuple[Any, Any]]) -> dict:
    """A msgpack map without repeated keys (msgpack itself would keep the last one silently)."""
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise ValueError("a map repeats a key")
    return mapping


def _no_binary(value: Any, depth: int = 0, allowed: frozenset[str] = frozenset()) -> None:
    """Raises ValueError on any bin or ext value (also empty ones, which the length limits let through)."""
    if isinstance(value, (bytes, msgpack.ExtType)) or depth > 32:
        raise ValueError("binary, ext or too deeply nested values are not allowed")
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in allowed:  # a mixture's sources hold counts too (their own token_counts)
                _no_binary(item, depth + 1, allowed if key == "sources" else frozenset())
    elif isinstance(value, list):
        for item in value:
            _no_binary(item, depth + 1, allowed)


def unpack_map(raw: memoryview, limit: int, max_entries: int, what: str, binary: frozenset[str] = frozenset()) -> dict:
    """A msgpack map of at most ``limit`` bytes: strings only as text, no bin or ext values (but
    as the values of the top-level keys in ``binary``), no repeated keys, containers of at most
    ``max_entries`` (maps: :data:`MAX_HEADER_ENTRIES`)."""
    if len(raw) > limit:
        raise WireError("header_size", f"{what} is {len(raw)} bytes, the limit is {limit}")
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=limit, max_bin_len=limit if binary else 0,
                                max_ext_len=0, max_array_len=max_entries, max_map_len=MAX_HEADER_ENTRIES,
                                object_pairs_hook=_pairs)
        _no_binary(value, allowed=binary)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise WireError("header_not_msgpack", f"{what} is not a msgpack map ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise WireError("header_schema", f"{what} is a {type(value).__name__}, not a map")
    return value


def _field(header: dict, name: str, kind: type) -> Any:
    value = header.get(name)
    if type(value) is not kind:
        raise WireError("header_schema", f"header field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def decode(frames: Sequence[Any], metas: Mapping[str, StreamMeta] = MappingProxyType({}),
           budget: MetaBudget | None = None) -> WireMessage | MetaMessage:
    """Validate and decode the frames of one message; raises :class:`WireError`.

    ``metas``: digest -> meta of the streams the receiver knows (from their meta messages); a
    protocol-2 batch must name one of them, else :class:`UnknownMeta`. ``budget``: the time
    that parsing metas not seen before may take (by default :data:`LIVE_META_BUDGET`, what a
    live receiver wants; :data:`UNLIMITED_META_BUDGET` when reading a recording).
    """
    budget = LIVE_META_BUDGET if budget is None else budget
    if not 2 <= len(frames) <= 1 + len(TENSOR_RANKS):
        raise WireError("frame_count", f"{len(frames)} frames, expected 2 (meta) or 5 to {1 + len(TENSOR_RANKS)} (batch)")
    header = unpack_map(_buffer(frames[0]), MAX_HEADER_BYTES, 1 << 17, "frame 0")
    if header.get("magic") != PROTOCOL_MAGIC:
        raise WireError("header_schema", f"magic is {_show(header.get('magic'))}, expected {PROTOCOL_MAGIC!r}")
    version = header.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise WireError("version", f"protocol version {_show(version)}, this side reads {list(READABLE_VERSIONS)}")
    kind = header.get("kind")
    keys = HEADER_KEYS.get((version, kind)) if type(kind) is str else None
    if keys is None:
        raise WireError("header_schema", f"message kind {_show(kind)} is not one of protocol {version}'s")
    if set(header) != keys:
        raise WireError("header_schema", f"header keys missing {sorted(keys - set(header))} / unknown "
                                         f"{_show(sorted(map(str, set(header) - keys)))}")
    producer_id = _field(header, "producer", str)
    if not 0 < len(producer_id) <= MAX_PRODUCER_ID_CHARS:
        raise WireError("header_schema", f"producer id must have 1..{MAX_PRODUCER_ID_CHARS} characters")
    try:
        return _decode_rest(frames, header, version, kind, producer_id, metas, budget)
    except WireError as error:
        error.producer_id = producer_id
        raise


def decode_stream(records: Iterable[Sequence[Any]]) -> Iterator[WireMessage | WireError]:
    """The messages of a recorded stream in order, as a receiver sees them: the metas its meta
    messages announce are learnt (and not yielded), each batch is yielded as a
    :class:`WireMessage`, each message that does not decode as its :class:`WireError`."""
    metas: dict[str, StreamMeta] = {}
    for frames in records:
        try:
            message = decode(frames, metas, UNLIMITED_META_BUDGET)
        except WireError as error:
            yield error
            continue
        if isinstance(message, MetaMessage):
            metas[message.meta.digest] = message.meta
        else:
            yield message


def _decode_rest(frames: Sequence[Any], header: dict, version: int, kind: str, producer_id: str,
                 metas: Mapping[str, StreamMeta], budget: MetaBudget) -> WireMessage | MetaMessage:
    seq = _field(header, "seq", int)
    if not 0 <= seq < 1 << 63:
        raise WireError("header_schema", f"seq {seq} is outside 0..2^63-1")
    incarnation = ""
    if version >= 2:
        incarnation = _field(header, "incarnation", str)
        if len(incarnation) != INCARNATION_HEX or not all(c in "0123456789abcdef" for c in incarnation):
            raise WireError("header_schema", f"incarnation must be {INCARNATION_HEX} lowercase hex digits")
    try:
        digest = _field(header, "meta_hash", str)
        if kind == KIND_META:
            if len(frames) != 2:
                raise WireError("frame_count", f"a meta message has 2 frames, not {len(frames)}")
            return MetaMessage(producer_id, incarnation, seq, _meta_frame(frames[1], digest, version, budget), tuple(frames))
        if version == 1:
            meta = _meta_v1(header.get("meta"), digest)
        else:
            meta = metas.get(digest)
            if meta is None:
                raise UnknownMeta(digest)
        return _decode_batch(frames, header, producer_id, incarnation, seq, meta)
    except WireError as error:
        error.incarnation, error.seq = incarnation, seq
        raise


# (digest, SHA-256 of the raw meta frame) -> meta: a meta message repeating a known meta is not
# parsed again. At most META_CACHE_SIZE metas and META_CACHE_BYTES (StreamMeta.nbytes), the oldest
# forgotten first.
_META_CACHE: dict[tuple[str, bytes], StreamMeta] = {}


class MetaBudget:
    """How much time parsing new metas may take: a bucket of seconds that fills at ``share``
    seconds a second up to ``burst``; a meta not in the cache is parsed only while the bucket is
    not empty, and what the parse took is taken out. So a flood of distinct large metas takes at
    most ``share`` of the receiver's time (and one parse beyond), the rest goes to batches; a
    producer's meta turned away this way comes again with its next meta message."""

    def __init__(self, share: float, burst: float) -> None:
        self.share, self.burst = share, burst
        self._seconds, self._at = burst, time.monotonic()

    def allows(self) -> bool:
        now = time.monotonic()
        self._seconds = min(self.burst, self._seconds + (now - self._at) * self.share)
        self._at = now
        return self._seconds > 0

    def spend(self, seconds: float) -> None:
        self._seconds -= seconds


# A live receiver: a quarter of its time at most for new metas, in bursts of up to 1 s.
LIVE_META_BUDGET = MetaBudget(share=0.25, burst=1.0)
UNLIMITED_META_BUDGET = MetaBudget(share=math.inf, burst=math.inf)


def _meta_frame(frame: Any, digest: str, version: int, budget: MetaBudget) -> StreamMeta:
    """The meta of a meta message's frame 1: protocol 3 carries ``token_counts`` as one bin value
    of little-endian uint64, protocol 2 as a msgpack array (old recordings)."""
    raw = _buffer(frame)
    key = (digest, hashlib.sha256(raw).digest())
    cached = _META_CACHE.get(key)
    if cached is not None:
        return cached
    if not budget.allows():
        raise WireError("meta", f"not parsed: new metas took their share ({budget.share:.0%}) of the receiver's time")
    started = time.monotonic()
    try:
        return _parse_meta(raw, digest, version, key)
    finally:
        budget.spend(time.monotonic() - started)


def _parse_meta(raw: memoryview, digest: str, version: int, key: tuple[str, bytes]) -> StreamMeta:
    try:
        if version >= 3:
            meta = StreamMeta.from_wire(unpack_map(raw, MAX_META_BYTES, MAX_HEADER_ENTRIES, "the meta frame",
                                                   binary=frozenset({"token_counts"})))
        else:
            meta = StreamMeta.from_dict(unpack_map(raw, MAX_META_BYTES, MAX_V2_META_COUNTS, "the meta frame"))
    except MetaError as error:
        raise WireError("meta", str(error)) from None
    if meta.digest != digest:
        raise WireError("meta", f"meta_hash {digest!r} does not match the meta ({meta.digest!r})")
    _META_CACHE[key] = meta
    while len(_META_CACHE) > 1 and (len(_META_CACHE) > META_CACHE_SIZE
                                    or sum(kept.nbytes for kept in _META_CACHE.values()) > META_CACHE_BYTES):
        _META_CACHE.pop(next(iter(_META_CACHE)))
    return meta


def _meta_v1(data: Any, digest: str) -> StreamMeta:
    """The inline meta of a protocol-1 batch, checked against its protocol-1 digest."""
    try:
        meta = StreamMeta.from_v1_dict(data)
    except MetaError as error:
        raise WireError("meta", str(error)) from None
    v1_digest = short_sha256(canonical_json(data).encode())
    if v1_digest != digest:
        raise WireError("meta", f"meta_hash {digest!r} does not match the meta ({v1_digest!r})")
    return meta


def _decode_batch(frames: Sequence[Any], header: dict, producer_id: str, incarnation: str, seq: int,
                  meta: StreamMeta) -> WireMessage:
    split = _field(header, "split", str)
    if split not in SPLITS:
        raise WireError("header_schema", f"split {_show(split)} is not one of {SPLITS}")
    index = _field(header, "index" if "index" in header else "val_index", int)
    if split == "val" and not 0 <= index < meta.val_messages:
        raise WireError("header_schema", f"val index {index} is outside the val set of {meta.val_messages} messages")
    if split == "train" and "index" not in header and index != -1:
        raise WireError("header_schema", f"a train message has val_index {index}, expected -1")
    if split == "train" and "index" in header and not 0 <= index < 1 << 63:
        raise WireError("header_schema", f"train index {index} is outside 0..2^63-1")
    descriptors = _field(header, "tensors", list)
    if len(descriptors) != len(frames) - 1:
        raise WireError("frame_count", f"header lists {len(descriptors)} tensors but {len(frames) - 1} tensor frames came")
    names = [d.get("name") if isinstance(d, dict) and set(d) == {"name", "dtype", "shape"} and type(d.get("name")) is str
             else None for d in descriptors]
    wanted = set(REQUIRED_TENSORS) | (set(OPTIONAL_TENSORS) & set(names))
    if sorted(map(str, names)) != sorted(wanted) or len(set(names)) != len(names):
        raise WireError("tensor_list", f"tensors {_show(names)}: each a map of name, dtype and shape, named "
                                       f"{sorted(REQUIRED_TENSORS)} plus optionally {list(OPTIONAL_TENSORS)}")
    tensors = _tensors(frames, descriptors, meta)
    valid_len = check_values(tensors, meta, split)
    return WireMessage(split, producer_id, incarnation, seq, index, meta, MappingProxyType(tensors), valid_len,
                       tuple(frames))


def _tensors(frames: Sequence[Any], descriptors: list[dict], meta: StreamMeta) -> dict[str, np.ndarray]:
    """Read-only arrays over the tensor frames, after checking each one's dtype, shape and size."""
    dtypes = tensor_dtypes(meta)
    rows = None
    tensors: dict[str, np.ndarray] = {}
    for descriptor, frame in zip(descriptors, frames[1:]):
        name = descriptor["name"]
        wire_dtype, rank = dtypes[name], TENSOR_RANKS[name]
        if descriptor["dtype"] != wire_dtype.str:
            raise WireError("dtype", f"tensor {name} has dtype {_show(descriptor['dtype'])}, the stream needs {wire_dtype.str!r}")
        shape = descriptor["shape"]
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
    return tensors


def tensor_names(meta: StreamMeta) -> tuple[str, ...]:
    """The tensors of every message of the stream ``meta`` pins (sorted): the four required ones,
    ``stage`` with a stages policy, ``source`` for a mixture (meta.sources)."""
    optional = {"stage": meta.corruption.carries_stage, "source": bool(meta.sources)}
    return tuple(sorted([*REQUIRED_TENSORS, *(name for name, carried in optional.items() if carried)]))


def check_values(tensors: Mapping[str, np.ndarray], meta: StreamMeta, split: str) -> np.ndarray:
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
    valid_len = _check_layout(x, y, mask, labelled, meta)
    _check_mask_ratio(ratio, labelled, valid_len, meta)
    carried = tensor_names(meta)
    _check_row_index("stage", tensors.get("stage"), "stage" in carried, meta.corruption.policy.stage_count(split),
                     "a stages stream", f"{split} stages")
    _check_row_index("source", tensors.get("source"), "source" in carried, len(meta.sources),
                     "a mixture (a meta with sources)", "sources of the mixture")
    return valid_len


def _check_layout(x: np.ndarray, y: np.ndarray, mask: np.ndarray, labelled: np.ndarray, meta: StreamMeta) -> np.ndarray:
    """Row layout (SPEC §2.3): attention_mask is a prefix of ones ending at [SEP]; [PAD] fills
    exactly the positions after it, which are never supervised. Returns valid_len int64 (R,)."""
    visible = mask.view(np.bool_)  # exact: every value is 0 or 1 (checked before)
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


def candidates(valid_len: np.ndarray, meta: StreamMeta) -> np.ndarray:
    """Corruption candidates per row (SPEC §2.5, :meth:`shared.corruption.Corruption.candidates`):
    the content (before [SEP] with line packing, every position with fixed packing), plus [SEP]
    itself when the stream makes it a candidate."""
    return meta.corruption.candidates(valid_len - int(meta.packing == "lines"), meta.packing)


def _check_mask_ratio(ratio: np.ndarray, labelled: np.ndarray, valid_len: np.ndarray, meta: StreamMeta) -> None:
    supervised = np.count_nonzero(labelled, axis=1)
    n_candidates = candidates(valid_len, meta)
    if meta.packing == "lines" and not meta.corruption.sep_is_candidate(meta.packing):
        if labelled[np.arange(len(valid_len)), valid_len - 1].any():
            raise WireError("layout", "[SEP] is supervised, but the stream does not make it a candidate (supervise_sep)")
    if (supervised > n_candidates).any():
        raise WireError("layout", "a row supervises more positions than it has corruption candidates")
    expected = supervised / np.maximum(n_candidates, 1)
    if not np.allclose(ratio, expected, rtol=0, atol=1e-6):
        raise WireError("value_range", "mask_ratio is not supervised / candidates in every row")


def _check_row_index(name: str, values: np.ndarray | None, carried: bool, count: int, owner: str, things: str) -> None:
    """An optional per-row index tensor (``stage``, ``source``): present exactly when the stream
    ``carried`` it (``owner`` names the streams that do), every value below ``count`` ``things``."""
    if not carried:
        if values is not None:
            raise WireError("tensor_list", f"only {owner} carries the {name} tensor")
        return
    if values is None:
        raise WireError("tensor_list", f"{owner} carries the {name} tensor")
    if int(values.max()) >= count:
        raise WireError("value_range", f"{name} {int(values.max())} is outside the {count} {things}")
