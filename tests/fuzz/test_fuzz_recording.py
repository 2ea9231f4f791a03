"""Fuzzing shared.recording.RecordingReader (issue 9 item 3).

Invariants on any file content (format 2: head CRC, resynchronization, end mark): opening raises
nothing but RecordingError; iterating raises nothing at all; every record it yields is one that
was written (the CRCs hold); the report adds up; no read asks for more bytes than the file still
holds (beyond a fixed 16-byte record head read), so a forged length can never make it allocate.
Memory stays bounded.

Case counts (reproducible): hypothesis 2,500 + seeded numpy loop 3,000 = 5,500.
"""

import builtins
import os
import resource
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import recording
from shared.recording import FORMAT_VERSION, MAGIC_PREFIX, RESYNC_FIRST_READ, RecordingError, RecordingReader, RecordingWriter
from shared.wire import encode, encode_meta

from helpers.wire import make_meta, make_tensors, mutate_bytes

FUZZ = dict(deadline=None, derandomize=True, database=None)
MAGIC = MAGIC_PREFIX + bytes([FORMAT_VERSION])
SMALL_READ = 16  # the reader may ask for a fixed-size record head even when fewer bytes remain
RECORD_MIN = 20  # a record's mark, length, body CRC, head CRC and frame count


def build_base():
    """A small recording: its bytes, its records' frames, where the file header ends and
    where each record starts."""
    meta = make_meta(block_size=4, rows_per_message=2, chars="ab")
    rng = np.random.default_rng(7)
    messages = [encode_meta(meta, "p", 0)]
    messages += [[bytes(f) for f in encode(meta, "train", "p", seq, make_tensors(meta, 1, rng), seq - 1)] for seq in range(1, 3)]
    messages += [[b""], [b"x", b"yz"]]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "base.rec")
        starts = []
        with RecordingWriter(path, {"meta": meta.to_dict()}) as writer:
            for frames in messages:
                writer.flush()
                starts.append(os.path.getsize(path))
                writer.write(frames)
        with open(path, "rb") as f:
            data = f.read()
    return data, messages, starts


BASE, RECORDS, RECORD_STARTS = build_base()
HEADER_END = RECORD_STARTS[0]


class TrackedFile:
    """A read-only file that checks every read request against what the file still holds."""

    def __init__(self, path, mode="rb"):
        assert mode == "rb", mode
        self._file = builtins.open(path, mode)
        self.size = os.fstat(self._file.fileno()).st_size
        self.bytes_read = 0

    def read(self, n=-1):
        remaining = self.size - self._file.tell()
        if n is not None and n >= 0:
            assert n <= max(remaining, SMALL_READ), f"asked for {n} bytes with {remaining} left"
        data = self._file.read(n)
        self.bytes_read += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._file, name)


def read_file(path):
    """Open and iterate a recording under :class:`TrackedFile`; return what came out, or None
    if it was refused at open time."""
    opened = []

    def tracked_open(file, mode="r", *args, **kwargs):
        opened.append(TrackedFile(file, mode))
        return opened[-1]

    recording.open = tracked_open  # module global: shadows the builtin inside shared.recording
    try:
        try:
            reader = RecordingReader(path)
        except RecordingError:
            assert opened[0].closed
            return None
        with reader:
            records = list(reader)
        assert opened[0].closed
        # Resynchronizing re-reads a little: at most the file twice, and a first window per damaged record.
        assert opened[0].bytes_read <= 2 * opened[0].size + reader.report.corrupt_records * (RESYNC_FIRST_READ + 16)
        return records, reader.report, opened[0].size
    finally:
        del recording.open


def check(data: bytes, path: str):
    with builtins.open(path, "wb") as f:
        f.write(data)
    result = read_file(path)
    intact_header = data[:HEADER_END] == BASE[:HEADER_END]
    if result is None:
        assert not intact_header, "a file with an intact header was refused"
        return "refused"
    records, report, size = result
    assert all(type(frames) is list and all(type(f) is bytes for f in frames) for frames in records)
    assert all(frames in RECORDS for frames in records), "a yielded record was never written"
    assert report.records == len(records)
    if intact_header:  # a damaged record costs at least a byte
        assert report.records * RECORD_MIN + report.corrupt_records <= size - HEADER_END
    assert 0 <= report.lost_bytes <= size
    if report.truncated:
        assert report.problem
    if not report.problem:
        assert report.lost_bytes == 0 and not report.truncated
    if report.clean_end:
        assert not report.truncated and report.lost_bytes == 0
    if data == BASE:
        assert records == RECORDS and report.corrupt_records == 0 and report.clean_end
    return "read"


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as directory:
        yield os.path.join(directory, "fuzz.rec")


def test_base_recording_reads_back(scratch):
    assert check(BASE, scratch) == "read"
    records, report, _ = read_file(scratch)
    assert records == RECORDS and report.records == len(RECORDS)


def test_tracked_file_catches_an_oversized_read(scratch):
    with builtins.open(scratch, "wb") as f:
        f.write(b"0123456789" * 5)
    tracked = TrackedFile(scratch)
    tracked.read(30)
    with pytest.raises(AssertionError):
        tracked.read(21)
    tracked.close()


u32_values = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 3, 4, 5, 64, 65, 2**16, 2**30, 2**30 + 1,
                                                                     2**31, 2**32 - 1]))
field_offsets = st.sampled_from(
    [len(MAGIC)] + [start + k for start in RECORD_STARTS for k in (4, 8, 12, 16, 20)] + [len(BASE) - 8, len(BASE) - 4]
)  # header_len; body_len, body CRC, head CRC, n_frames, first frame length; the end mark's count and CRC
mutation = st.one_of(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "overwrite", "truncate"]), st.integers(0, 2**12),
              st.binary(max_size=8)),
    st.tuples(st.just("u32"), field_offsets, u32_values),
)


@given(st.lists(mutation, min_size=1, max_size=4))
@settings(max_examples=2500, **FUZZ)
def test_fuzz_mutated_recordings(scratch, mutations):
    data = BASE
    for kind, position, payload in mutations:
        if kind == "u32":
            data = data[:position] + struct.pack("<I", payload) + data[position + 4:]
        else:
            data = mutate_bytes(data, kind, position, payload)
    check(data, scratch)


def test_fuzz_seeded_numpy_loop_with_bounded_memory(scratch):
    rng = np.random.default_rng(99)
    cases = 3000
    outcomes = {"refused": 0, "read": 0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(cases):
        if case % 10 == 0:
            data = bytes(rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8))
            if case % 20 == 0:
                data = BASE[:HEADER_END] + data
        else:
            data = BASE
            for _ in range(int(rng.integers(1, 4))):
                if rng.random() < 0.3:
                    where = RECORD_STARTS[int(rng.integers(0, len(RECORD_STARTS)))] + 4 * int(rng.integers(1, 6))
                    value = int(rng.choice([0, 3, 4, 65, 2**30 + 1, 2**32 - 1, int(rng.integers(0, 2**32))]))
                    data = data[:where] + struct.pack("<I", value) + data[where + 4:]
                else:
                    kind = ["flip", "insert", "delete", "overwrite", "truncate"][int(rng.integers(0, 5))]
                    payload = bytes(rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8))
                    data = mutate_bytes(data, kind, int(rng.integers(0, len(data) + 1)), payload)
        if case == 500:
            tracemalloc.start()
        outcomes[check(data, scratch)] += 1
        if case == 999:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < 2 << 20, peak
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 32 * 1024
    assert outcomes["read"] > 1000 and outcomes["refused"] > 100, outcomes


@pytest.mark.parametrize("declared", [2**32 - 1, 2**30, 2**30 + 1, 2**16, 2**16 + 1])
def test_forged_lengths_never_allocate(scratch, declared):
    header_forged = BASE[: len(MAGIC)] + struct.pack("<I", declared) + BASE[len(MAGIC) + 4:]
    body_forged = BASE[: RECORD_STARTS[1] + 4] + struct.pack("<I", declared) + BASE[RECORD_STARTS[1] + 8:]
    tracemalloc.start()
    assert check(header_forged, scratch) == ("read" if declared == len(BASE[len(MAGIC) + 4: HEADER_END]) else "refused")
    assert check(body_forged, scratch) == "read"
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20
