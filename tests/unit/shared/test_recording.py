"""Recording file format (docs/SPEC.md §5): exact round trip, truncation, CRC, bad files."""

import struct
import zlib

import msgpack
import numpy as np
import pytest

from shared.recording import (
    MAGIC,
    MAX_FRAMES,
    RECORD_MARK,
    RecordingError,
    RecordingReader,
    RecordingWriter,
)
from shared.wire import decode, encode

from helpers.wire import make_meta, make_tensors

FILE_HEAD = len(MAGIC) + 4
RECORD_HEAD = 12


def message_frames(count, seed=0):
    """``count`` wire messages' frames (numpy arrays and bytes, as the producer makes them)."""
    meta = make_meta(block_size=8, rows_per_message=3)
    rng = np.random.default_rng(seed)
    return [
        encode(meta, "train", "p", seq, make_tensors(meta, 1 + seq % 3, rng, with_stage=seq % 2 == 0))
        for seq in range(count)
    ]


def as_bytes(frames):
    return [bytes(memoryview(f).cast("B")) for f in frames]


def write(path, messages, info=None):
    """Write ``messages`` and return the byte offset where each record starts, plus the end."""
    offsets = []
    with RecordingWriter(path, info) as writer:
        for frames in messages:
            writer.flush()
            offsets.append(path.stat().st_size)
            writer.write(frames)
    offsets.append(path.stat().st_size)
    return offsets


def read(path):
    with RecordingReader(path) as reader:
        return list(reader), reader.report, reader.info


def test_round_trip_exact_frames(tmp_path):
    messages = message_frames(25)
    path = tmp_path / "a.rec"
    write(path, messages, {"meta": make_meta().to_dict(), "note": "hello"})
    records, report, info = read(path)
    assert records == [as_bytes(m) for m in messages]
    assert all(type(f) is bytes for r in records for f in r)
    assert (report.records, report.corrupt_records, report.truncated, report.lost_bytes, report.problem) == (
        25, 0, False, 0, "")
    assert info == {"format_version": 1, "meta": make_meta().to_dict(), "note": "hello"}
    for frames, record in zip(messages, records):
        assert decode(record).seq == decode(frames).seq


def test_round_trip_odd_frames(tmp_path):
    messages = [[b""], [b"a"], [b"", b"", b""], [bytearray(b"xyz"), memoryview(b"uvw")], [b"\x00" * 70_000],
                [np.arange(6, dtype="<u2").reshape(2, 3)], [b"f"] * MAX_FRAMES, []]
    path = tmp_path / "odd.rec"
    write(path, messages)
    records, report, _ = read(path)
    assert records == [as_bytes(m) for m in messages]
    assert report.records == len(messages) and report.corrupt_records == 0


def test_writer_counts_and_default_info(tmp_path):
    path = tmp_path / "a.rec"
    with RecordingWriter(path) as writer:
        for frames in message_frames(3):
            writer.write(frames)
        assert writer.records == 3
    assert read(path)[2] == {"format_version": 1}


def test_zero_records(tmp_path):
    path = tmp_path / "empty.rec"
    RecordingWriter(path, {"k": 1}).close()
    records, report, info = read(path)
    assert records == [] and info == {"format_version": 1, "k": 1}
    assert (report.records, report.truncated, report.lost_bytes, report.problem) == (0, False, 0, "")


def test_truncated_tail_at_every_byte_of_the_last_record(tmp_path):
    messages = message_frames(4)
    full = tmp_path / "full.rec"
    offsets = write(full, messages)
    data = full.read_bytes()
    last_start, end = offsets[-2], offsets[-1]
    expected = [as_bytes(m) for m in messages[:-1]]
    cut_path = tmp_path / "cut.rec"
    for cut in range(last_start, end):
        cut_path.write_bytes(data[:cut])
        records, report, _ = read(cut_path)
        assert records == expected, cut
        assert report.records == 3 and report.corrupt_records == 0
        assert report.truncated == (cut > last_start), cut
        assert report.lost_bytes == cut - last_start, cut
        assert bool(report.problem) == (cut > last_start)


def test_truncated_inside_an_earlier_record(tmp_path):
    messages = message_frames(5)
    path = tmp_path / "a.rec"
    offsets = write(path, messages)
    data = path.read_bytes()
    cut = offsets[2] + 20
    path.write_bytes(data[:cut])
    records, report, _ = read(path)
    assert records == [as_bytes(m) for m in messages[:2]]
    assert report.truncated and report.lost_bytes == 20


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_flipped_body_byte_caught_by_crc(tmp_path, victim):
    messages = message_frames(5)
    path = tmp_path / "a.rec"
    offsets = write(path, messages)
    data = path.read_bytes()
    expected = [as_bytes(m) for i, m in enumerate(messages) if i != victim]
    for position in range(offsets[victim] + RECORD_HEAD, offsets[victim + 1]):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x01 << (position % 8)
        path.write_bytes(corrupted)
        records, report, _ = read(path)
        assert records == expected, position
        assert (report.records, report.corrupt_records, report.truncated, report.lost_bytes) == (4, 1, False, 0)


@pytest.mark.parametrize("byte", range(8, 12))
def test_flipped_crc_byte_skips_the_record(tmp_path, byte):
    messages = message_frames(3)
    path = tmp_path / "a.rec"
    offsets = write(path, messages)
    corrupted = bytearray(path.read_bytes())
    corrupted[offsets[1] + byte] ^= 0xFF
    path.write_bytes(corrupted)
    records, report, _ = read(path)
    assert records == [as_bytes(messages[0]), as_bytes(messages[2])]
    assert report.corrupt_records == 1 and report.records == 2


@pytest.mark.parametrize("byte", range(0, 8))
@pytest.mark.parametrize("xor", [0x01, 0x80, 0xFF])
def test_flipped_mark_or_length_byte_stops_with_a_problem(tmp_path, byte, xor):
    messages = message_frames(4)
    path = tmp_path / "a.rec"
    offsets = write(path, messages)
    corrupted = bytearray(path.read_bytes())
    corrupted[offsets[1] + byte] ^= xor
    path.write_bytes(corrupted)
    records, report, _ = read(path)
    assert records == [as_bytes(messages[0])]
    assert report.problem
    assert report.corrupt_records <= 1
    assert 0 < report.lost_bytes <= offsets[-1] - offsets[1]
    if byte < 4:  # the mark itself
        assert not report.truncated and report.lost_bytes == offsets[-1] - offsets[1]
        assert f"byte {offsets[1]}" in report.problem


def test_consistent_crc_but_bad_frame_table_is_corrupt(tmp_path):
    path = tmp_path / "a.rec"
    write(path, message_frames(1))
    for body in (struct.pack("<3I", 2, 1, 5) + b"abc", struct.pack("<I", MAX_FRAMES + 1), struct.pack("<I", 2**32 - 1)):
        with open(path, "ab") as f:
            f.write(struct.pack("<4sII", RECORD_MARK, len(body), zlib.crc32(body)) + body)
    with open(path, "ab") as f:
        f.write(struct.pack("<4sII", RECORD_MARK, 8, zlib.crc32(struct.pack("<2I", 1, 0))) + struct.pack("<2I", 1, 0))
    records, report, _ = read(path)
    assert records == [as_bytes(message_frames(1)[0]), [b""]]
    assert report.corrupt_records == 3 and report.records == 2 and not report.problem


@pytest.mark.parametrize("body_len", [0, 3, 2**30 + 1, 2**32 - 1])
def test_implausible_body_length_stops(tmp_path, body_len):
    path = tmp_path / "a.rec"
    write(path, [])
    with open(path, "ab") as f:
        f.write(struct.pack("<4sII", RECORD_MARK, body_len, 0) + b"\x00" * 16)
    records, report, _ = read(path)
    assert records == [] and report.problem and report.lost_bytes == 28


def test_reading_twice_yields_nothing_more(tmp_path):
    path = tmp_path / "a.rec"
    write(path, message_frames(2))
    with RecordingReader(path) as reader:
        assert len(list(reader)) == 2
        assert list(reader) == []
        assert reader.report.records == 2


def header_file(header_bytes, declared_len=None):
    length = len(header_bytes) if declared_len is None else declared_len
    return MAGIC + struct.pack("<I", length) + header_bytes


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"L",
        MAGIC,
        MAGIC + b"\x00\x00",
        b"LPKREC\x00\x02" + struct.pack("<I", 1) + b"\x80",
        b"XXXXXXXX" + struct.pack("<I", 1) + b"\x80",
        header_file(b"\x80"),  # no format_version
        header_file(msgpack.packb({"format_version": 2})),
        header_file(msgpack.packb({"format_version": True})),
        header_file(msgpack.packb([1])),
        header_file(msgpack.packb(None)),
        header_file(b"\xc1"),
        header_file(b""),
        header_file(msgpack.packb({"format_version": 1}), declared_len=100),
        header_file(msgpack.packb({"format_version": 1}), declared_len=2**32 - 1),
        header_file(b"\x80" + b"\x00" * 70_000, declared_len=70_001),
        header_file(msgpack.packb({"format_version": 1}) + b"\x00"),  # trailing byte inside the header
        header_file(b"\x82\xaeformat_version\x02\xa1k" + b"\x91" * 1000 + b"\xc0"),
        header_file(b"\x91" * 5000 + b"\xc0"),
    ],
)
def test_not_a_recording(tmp_path, data):
    path = tmp_path / "bad.rec"
    path.write_bytes(data)
    with pytest.raises(RecordingError):
        RecordingReader(path)


def test_writer_refuses_huge_info(tmp_path):
    with pytest.raises(ValueError):
        RecordingWriter(tmp_path / "a.rec", {"blob": "x" * 70_000})
    assert not (tmp_path / "a.rec").exists()


def test_info_with_bytes_is_readable(tmp_path):
    path = tmp_path / "a.rec"
    RecordingWriter(path, {"blob": b"\x00\x01"}).close()
    assert read(path)[2]["blob"] == b"\x00\x01"
