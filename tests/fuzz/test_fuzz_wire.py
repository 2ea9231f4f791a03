"""Fuzzing shared.wire.decode (issue 9 item 3).

Invariant: ``decode`` (by a receiver that has pinned the base metas) returns a WireMessage that
passes an independent re-check of every contract rule (:func:`helpers.wire.assert_valid_message`)
or a MetaMessage whose meta is exactly its meta frame, or raises WireError with a known reason.
The bases are protocol-2 meta messages and batches of six metas (both packings, 3 to 200
characters, with and without stages). Any other exception (IndexError, TypeError, KeyError, OverflowError, MemoryError,
RecursionError, ...) fails the test. Memory growth over the fuzz stays bounded.

Case counts (all reproducible: hypothesis derandomized without a database, numpy seeded):
hypothesis 1,500 + 3,000 + 2,000 + 800 + 300 = 7,600; seeded numpy loop 20,000;
fixed hostile cases 200 (deep nesting, giant lengths and headers, huge shapes). Total 27,800.
"""

import resource
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.wire import HEADER_KEYS, KIND_BATCH, KIND_META, MAX_HEADER_BYTES, REASONS, MetaMessage, WireError, WireMessage, decode, encode

from helpers.wire import INCARNATION, STAGES, assert_valid_message, make_meta, make_tensors, meta_frames, mutate_bytes, vocab_chars

FUZZ = dict(deadline=None, derandomize=True, database=None)
TOP_FIELDS = sorted(HEADER_KEYS[(3, KIND_BATCH)] | HEADER_KEYS[(3, KIND_META)])
META_FIELDS = list(make_meta().to_wire())
DESCRIPTOR_FIELDS = ["name", "dtype", "shape"]


def base_metas():
    """Stream metas covering both packings, a 3- to 200-character vocabulary, and a stages stream."""
    metas = []
    specs = [(16, 4, vocab_chars(20), "lines"), (8, 2, vocab_chars(3), "fixed"), (5, 3, vocab_chars(200), "lines")]
    for block_size, rows_per_message, chars, packing in specs:
        metas.append(make_meta(block_size, rows_per_message, chars, packing))
        metas.append(make_meta(block_size, rows_per_message, chars, packing, corruption=STAGES))
    return metas


def base_messages(metas):
    """Valid messages (frames as bytes): every meta's meta message, then its batches of 1..R rows
    on both splits (the stages metas' batches carry the stage tensor)."""
    messages = []
    rng = np.random.default_rng(2024)
    for meta in metas:
        messages.append(meta_frames(meta, "producer-m", 0))
        for rows in range(1, meta.rows_per_message + 1):
            split, index = ("val", rows % meta.val_messages) if rows % 2 else ("train", rows)
            tensors = make_tensors(meta, rows, rng)
            frames = encode(meta, split, f"producer-{rows}", rows * 3, tensors, index, incarnation=INCARNATION)
            messages.append([bytes(f) for f in frames])
    return messages


METAS_LIST = base_metas()
METAS = {meta.digest: meta for meta in METAS_LIST}  # what a receiver has pinned
BASES = base_messages(METAS_LIST)
META_MESSAGE = BASES[0]  # the first meta's meta message
BATCH = BASES[1]  # one of its batches (3 rows of 4, val split)
BATCHES = [frames for frames in BASES if len(frames) > 2]


def check(frames):
    """Decode ``frames`` with :data:`METAS` known; return the rejection reason or "accepted".
    Other exceptions propagate."""
    try:
        message = decode(frames, METAS)
    except WireError as error:
        assert error.reason in REASONS
        assert len(str(error)) < 2000, "error messages must stay short"
        return error.reason
    if isinstance(message, MetaMessage):
        header = msgpack.unpackb(frames[0], raw=False)
        assert header["kind"] == KIND_META and message.meta.digest == header["meta_hash"]
        assert msgpack.unpackb(frames[1], raw=False) == message.meta.to_wire()
        return "accepted"
    assert isinstance(message, WireMessage)
    assert_valid_message(message)
    return "accepted"


def test_every_base_message_is_accepted():
    assert len(BASES) == 2 * (3 + 4 + 2 + 3)
    assert all(check(frames) == "accepted" for frames in BASES)
    assert {len(frames) for frames in BASES} == {2, 5, 6}


# ---------------------------------------------------------------- mutations


def mutate_frames(frames: list, kind: str, a: int, b: int) -> list:
    frames = list(frames)
    if kind == "swap" and len(frames) >= 2:
        a, b = a % len(frames), b % len(frames)
        frames[a], frames[b] = frames[b], frames[a]
    elif kind == "drop" and frames:
        del frames[a % len(frames)]
    elif kind == "duplicate" and frames:
        frames.insert(b % (len(frames) + 1), frames[a % len(frames)])
    return frames


def replace_field(frames: list, where: str, key, value) -> list:
    """The frames with one value replaced: a header field (``top``), a field of a meta message's
    meta frame (``meta``), or a batch's tensor descriptor field (``descriptor``; ``key`` is then
    ``(index, field)``). Unchanged where the place is not there (a batch has no meta frame, or an
    earlier mutation broke the map)."""
    try:
        header = msgpack.unpackb(frames[0], raw=False)
        if where == "meta":
            if not isinstance(header, dict) or header.get("kind") != KIND_META or len(frames) < 2:
                return frames
            meta = msgpack.unpackb(frames[1], raw=False)
            if not isinstance(meta, dict):
                return frames
            meta[key] = value
            return [frames[0], msgpack.packb(meta, use_bin_type=True), *frames[2:]]
    except (ValueError, msgpack.UnpackException):  # an earlier mutation broke the map
        return frames
    if where == "top":
        target = header
    else:
        descriptors = header.get("tensors") if isinstance(header, dict) else None
        index, key = key
        target = descriptors[index % len(descriptors)] if isinstance(descriptors, list) and descriptors else None
    if not isinstance(target, dict):
        return frames
    target[key] = value
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


# JSON-like msgpack values, with the edge cases a header field could be replaced with.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["linepack", "batch", "train", "val", "x", "y", "attention_mask", "mask_ratio", "stage",
                     "<u2", "<i2", "|u1", "<f4", "lines", "fixed", "random", "epoch", "", "\U0001f600"]),
    st.sampled_from([0, 1, -1, 2, 3, 4, 16, 17, 2**31, 2**32, 2**40, -(2**40), 2**63 - 1, 2**64 - 1, -(2**63)]),
)
msgpack_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)
byte_mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "overwrite", "truncate"]),
    st.integers(0, 4),  # which frame
    st.integers(0, 2**16),  # where in it
    st.binary(min_size=0, max_size=8),
)
frame_mutation = st.tuples(st.sampled_from(["swap", "drop", "duplicate"]), st.integers(0, 6), st.integers(0, 6))


@given(st.lists(st.binary(max_size=200), max_size=7))
@settings(max_examples=1500, **FUZZ)
def test_fuzz_random_byte_frames(frames):
    check(frames)


@given(st.integers(0, len(BASES) - 1), st.lists(st.one_of(byte_mutation, frame_mutation), min_size=1, max_size=4))
@settings(max_examples=3000, **FUZZ)
def test_fuzz_mutated_messages(base, mutations):
    frames = list(BASES[base])
    for mutation in mutations:
        if len(mutation) == 4:
            kind, index, position, payload = mutation
            if frames:
                index %= len(frames)
                frames[index] = mutate_bytes(frames[index], kind, position, payload)
        else:
            frames = mutate_frames(frames, *mutation)
    check(frames)


field_choice = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(TOP_FIELDS + ["extra"])),
    st.tuples(st.just("meta"), st.sampled_from(META_FIELDS + ["extra"])),
    st.tuples(st.just("descriptor"), st.tuples(st.integers(0, 4), st.sampled_from(DESCRIPTOR_FIELDS + ["extra"]))),
)


@given(st.integers(0, len(BASES) - 1), st.lists(st.tuples(field_choice, msgpack_values), min_size=1, max_size=3))
@settings(max_examples=2000, **FUZZ)
def test_fuzz_header_fields_replaced(base, replacements):
    frames = BASES[base]
    for (where, key), value in replacements:
        frames = replace_field(frames, where, key, value)
    check(frames)


big_ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**31, 2**32, 2**40, 2**62, 2**63]))


@given(st.integers(0, len(BATCHES) - 1), st.integers(0, 4), st.lists(big_ints, min_size=0, max_size=4))
@settings(max_examples=800, **FUZZ)
def test_fuzz_declared_shapes(base, index, shape):
    """Huge, negative and wrong-rank shapes are refused before anything is allocated."""
    frames = replace_field(BATCHES[base], "descriptor", (index, "shape"), shape)
    result = check(frames)
    if any(n < 0 or n > 2**20 for n in shape):
        assert result == "shape"


@given(st.integers(0, len(BASES) - 1), st.integers(0, 4), st.binary(min_size=0, max_size=64))
@settings(max_examples=300, **FUZZ)
def test_fuzz_tensor_frame_replaced(base, index, data):
    frames = list(BASES[base])
    frames[1 + index % (len(frames) - 1)] = data
    check(frames)


# ---------------------------------------------------------------- seeded numpy loop

HEADER_VALUES = [None, True, False, 0, 1, -1, 2, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 0.5, float("nan"),
                 float("inf"), "", "x", "linepack", "val", "y" * 300, [], [1], [2**40, 2**40], [-1, 16], {}, {"a": 1},
                 [[[]]], {"name": "x"}]


def poke_tensor(rng: np.random.Generator, frames: list) -> list:
    """Set one element of one tensor frame to a value near a layout or range boundary."""
    header = msgpack.unpackb(frames[0], raw=False) if frames else None
    if not isinstance(header, dict):
        return frames
    digest = header.get("meta_hash")
    meta, descriptors = METAS.get(digest) if type(digest) is str else None, header.get("tensors")
    if meta is None or not isinstance(descriptors, list) or len(descriptors) != len(frames) - 1:
        return frames
    index = int(rng.integers(0, len(descriptors)))
    descriptor = descriptors[index]
    if not isinstance(descriptor, dict) or descriptor.get("dtype") not in ("<u2", "<i2", "<u4", "<i4", "|u1", "<f4"):
        return frames
    array = np.frombuffer(frames[1 + index], dtype=descriptor["dtype"]).copy()
    if array.size == 0:
        return frames
    specials = [meta.mask_id, meta.sep_id, meta.pad_id, meta.vocab_size]
    values = [0, 1, 2, -100, -1, 255, float("nan"), 1.5, *specials]
    with np.errstate(all="ignore"):
        array[int(rng.integers(0, array.size))] = np.array(values[int(rng.integers(0, len(values)))]).astype(array.dtype)
    return [*frames[: 1 + index], array.tobytes(), *frames[2 + index:]]


def rng_mutation(rng: np.random.Generator, frames: list) -> list:
    """One random mutation of a message, drawn from ``rng``."""
    choice = rng.integers(0, 12)
    if choice >= 10:
        try:
            return poke_tensor(rng, frames)
        except (ValueError, msgpack.UnpackException):  # an earlier mutation broke the header
            return frames
    if choice <= 5:  # byte-level edit of a random frame
        kind = ["flip", "insert", "delete", "overwrite", "truncate", "flip"][choice]
        index = int(rng.integers(0, len(frames))) if frames else 0
        if not frames:
            return [bytes(rng.integers(0, 256, size=int(rng.integers(0, 20)), dtype=np.uint8))]
        payload = bytes(rng.integers(0, 256, size=int(rng.integers(1, 6)), dtype=np.uint8))
        frames = list(frames)
        frames[index] = mutate_bytes(frames[index], kind, int(rng.integers(0, 2**16)), payload)
        return frames
    if choice <= 7:
        kind = ["swap", "drop", "duplicate"][int(rng.integers(0, 3))]
        return mutate_frames(frames, kind, int(rng.integers(0, 7)), int(rng.integers(0, 7)))
    try:
        if not isinstance(msgpack.unpackb(frames[0], raw=False), dict):
            return frames
    except (ValueError, msgpack.UnpackException):  # an earlier mutation broke the header
        return frames
    value = HEADER_VALUES[int(rng.integers(0, len(HEADER_VALUES)))]
    where = ["top", "meta", "descriptor"][int(rng.integers(0, 3))]
    if where == "top":
        key = TOP_FIELDS[int(rng.integers(0, len(TOP_FIELDS)))]
    elif where == "meta":
        key = META_FIELDS[int(rng.integers(0, len(META_FIELDS)))]
    else:
        key = (int(rng.integers(0, 5)), DESCRIPTOR_FIELDS[int(rng.integers(0, 3))])
    return replace_field(frames, where, key, value)


def test_fuzz_seeded_numpy_loop_with_bounded_memory():
    rng = np.random.default_rng(12345)
    cases = 20_000
    outcomes: dict[str, int] = {}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    for case in range(cases):
        frames = BASES[int(rng.integers(0, len(BASES)))]
        for _ in range(int(rng.integers(1, 4))):
            frames = rng_mutation(rng, frames)
        if case == 1000:
            tracemalloc.start()
        result = check(frames)
        if case == 1999:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < 4 << 20, f"decode of small messages peaked at {peak} bytes"
        outcomes[result] = outcomes.get(result, 0) + 1
    elapsed = time.perf_counter() - start
    rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert rss_growth_kib < 64 * 1024, f"max RSS grew by {rss_growth_kib} KiB"
    assert sum(outcomes.values()) == cases
    # The mix must exercise acceptance and most rejection paths, or the fuzz is not doing its job.
    assert outcomes.get("accepted", 0) > 100, outcomes
    assert set(outcomes) == {"accepted", *REASONS} - {"header_size"}, outcomes
    assert elapsed < 60


# ---------------------------------------------------------------- hostile headers


def deep(depth: int, container: bytes = b"\x91") -> bytes:
    """A msgpack value nested ``depth`` levels deep (fixarray of 1, or fixmap of 1 with key "k")."""
    return container * depth + b"\xc0"


def splice(frames: list, field: str, raw_value: bytes, where: str = "top") -> list:
    """The frames with one header (or meta frame) value replaced by raw msgpack bytes (to bypass
    the packer's limits)."""
    marker = msgpack.packb("@@marker@@")
    swapped = replace_field(frames, where, field, "@@marker@@")
    index = 1 if where == "meta" else 0
    assert marker in swapped[index], (where, field)
    return [*swapped[:index], swapped[index].replace(marker, raw_value), *swapped[index + 1:]]


@pytest.mark.parametrize("depth", [10_000, 1023, 1000, 600])
@pytest.mark.parametrize("container", [b"\x91", b"\x81\xa1k"])
def test_deep_nesting_everywhere(depth, container):
    raw = deep(depth, container)
    for frames in (META_MESSAGE, BATCH):
        assert check([raw, *frames[1:]]) in ("header_not_msgpack", "header_schema")
        for field in TOP_FIELDS:
            check(splice(frames, field, raw))
    for field in ("vocab", "corruption", "token_counts", "seed"):
        assert check(splice(META_MESSAGE, field, raw, "meta")) in ("meta", "header_not_msgpack")
    for field in DESCRIPTOR_FIELDS:
        assert check(splice(BATCH, (0, field), raw, "descriptor")) != "accepted"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xdb\xff\xff\xff\xff" + b"abc",  # str32 declaring 4 GiB
        b"\xc6\xff\xff\xff\xff" + b"abc",  # bin32 declaring 4 GiB
        b"\xdd\xff\xff\xff\xff" + b"\xc0" * 10,  # array32 declaring 4 G items
        b"\xdf\xff\xff\xff\xff" + b"\xc0" * 10,  # map32 declaring 4 G pairs
        b"\xdd\x00\x02\x00\x00" + b"\xc0" * (1 << 17),  # array over max_array_len
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
    ],
    ids=["str32", "bin32", "array32", "map32", "array_over_limit", "ext32"],
)
def test_giant_declared_msgpack_lengths(raw):
    tracemalloc.start()
    start = time.perf_counter()
    results = [check([raw, *BATCH[1:]]), check(splice(BATCH, "producer", raw)), check([raw, *META_MESSAGE[1:]]),
               check(splice(META_MESSAGE, "vocab", raw, "meta")), check([META_MESSAGE[0], raw])]
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "accepted" not in results
    assert elapsed < 2 and peak < 8 << 20


def test_giant_headers():
    frames = BATCH
    assert check([b"\x80" + b"\xc0" * MAX_HEADER_BYTES, *frames[1:]]) == "header_size"
    near_limit = replace_field(frames, "top", "padding", "p" * (MAX_HEADER_BYTES - 2000))
    assert len(near_limit[0]) <= MAX_HEADER_BYTES and check(near_limit) == "header_schema"  # an unknown key
    assert check(replace_field(frames, "top", "padding", [0] * (1 << 17))) == "header_schema"
    assert check(replace_field(frames, "top", "padding", [0] * ((1 << 17) + 1))) == "header_not_msgpack"  # over the array limit
    assert check(replace_field(frames, "top", "tensors", [{"name": "x"}] * (1 << 16))) == "frame_count"
    assert check(replace_field(frames, "top", "producer", "p" * (MAX_HEADER_BYTES - 2000))) == "header_schema"
    assert check(replace_field(META_MESSAGE, "meta", "vocab", vocab_chars(5000) * 3)) == "meta"


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**63, 16], [2**64 - 1, 2**64 - 1], [-(2**63), -(2**63)],
                                   [-1, 16], [4, -16], [0, 0], [4, 2**40]])
def test_huge_and_negative_declared_shapes(shape):
    frames = BASES[3]
    assert len(frames) == 5
    for index in range(4):
        tracemalloc.start()
        start = time.perf_counter()
        result = check(replace_field(frames, "descriptor", (index, "shape"), shape[: 1 + (index < 3)]))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert result == "shape" and elapsed < 0.5 and peak < 1 << 20
