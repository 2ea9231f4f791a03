"""Recording file format (docs/SPEC.md §5, docs/PROTOCOL.md §8): exact round trip, truncation,
CRCs of heads and bodies, resynchronization after damage, the end mark, appending, the lock,
bad files, and format 1 files still read."""

import struct
import zlib

import msgpack
import numpy as np
import pytest

from shared.recording import (
    END_MARK,
    MAGIC_PREFIX,
    MAX_FRAMES,
    RECORD_MARK,
    RecordingError,
    RecordingReader,
    RecordingWriter,
)
from shared.wire import encode

from helpers.wire import STAGES, decode_with, make_meta, make_tensors

MAGIC = MAGIC_PREFIX + b"\x02"
RECORD_HEAD = 16  # mark, body_len, body_crc, head_crc
END_BYTES = 12
META = make_meta(block_size=8, rows_per_message=3, corruption=STAGES)


def message_frames(count, seed=0):
    """``count`` wire messages' frames (numpy arrays and bytes, as the producer makes them)."""
    rng = np.random.default_rng(seed)
    return [encode(META, "train", "p", seq, make_tensors(META, 1 + seq % 3, rng), 0) for seq in range(count)]


def as_bytes(frames):
    return [bytes(memoryview(f).cast("B")) for f in frames]


def write(path, messages, info=None):
    """Write ``messages``; the byte offset where each record starts, then where the end mark starts."""
    offsets = []
    with RecordingWriter(path, info) as writer:
        for frames in messages:
            writer.flush()
            offsets.append(path.stat().st_size)
            writer.write(frames)
        writer.flush()
        offsets.append(path.stat().st_size)
    return offsets


def read(path):
    with RecordingReader(path) as reader:
        return list(reader), reader.report, reader.info


def record_head(body):
    head = struct.pack("<4sII", RECORD_MARK, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head))


def test_round_trip_exact_frames(tmp_path):
    messages = message_frames(25)
    path = tmp_path / "a.rec"
    write(path, messages, {"meta": make_meta().to_dict(), "note": "hello"})
    records, report, info = read(path)
    assert records == [as_bytes(m) for m in messages]
    assert all(type(f) is bytes for r in records for f in r)
    assert (report.records, report.corrupt_records, report.truncated, report.lost_bytes, report.problem) == (
        25, 0, False, 0, "")
    assert report.clean_end and report.skipped_bytes == 0
    assert info == {"format_version": 2, "meta": make_meta().to_dict(), "note": "hello"}
    for frames, record in zip(messages, records):
        assert decode_with(META, record).seq == decode_with(META, frames).seq


def test_round_trip_odd_frames(tmp_path):
    messages = [[b""], [b"a"], [b"", b"", b""], [bytearray(b"xyz"), memoryview(b"uvw")], [b"\x00" * 70_000],
                [np.arange(6, dtype="<u2").reshape(2, 3)], [b"f"] * MAX_FRAMES]
    path = tmp_path / "odd.rec"
    write(path, messages)
    records, report, _ = read(path)
    assert records == [as_bytes(m) for m in messages]
    assert report.records == len(messages) and report.corrupt_records == 0


@pytest.mark.parametrize("frames", [[], [b"f"] * (MAX_FRAMES + 1)])
def test_the_writer_refuses_what_its_reader_would_reject(tmp_path, frames):
    with RecordingWriter(tmp_path / "a.rec") as writer, pytest.raises(RecordingError, match="frames"):
        writer.write(frames)
    assert read(tmp_path / "a.rec")[1].records == 0


def test_writer_counts_and_default_info(tmp_path):
    path = tmp_path / "a.rec"
    with RecordingWriter(path) as writer:
        for frames in message_frames(3):
            writer.write(frames)
        assert writer.records == 3
    assert read(path)[2] == {"format_version": 2}


def test_information_cannot_replace_the_format_version(tmp_path):
    with pytest.raises(RecordingError, match="format_version"):
        RecordingWriter(tmp_path / "a.rec", {"format_version": 99})
    assert not (tmp_path / "a.rec").exists()


def test_zero_records(tmp_path):
    path = tmp_path / "empty.rec"
    RecordingWriter(path, {"k": 1}).close()
    records, report, info = read(path)
    assert records == [] and info == {"format_version": 2, "k": 1}
    assert (report.records, report.truncated, report.lost_bytes, report.problem, report.clean_end) == (0, False, 0, "", True)


def test_a_file_without_its_end_mark_was_cut_short(tmp_path):
    path = tmp_path / "a.rec"
    offsets = write(path, message_frames(3))
    data = path.read_bytes()
    path.write_bytes(data[: offsets[-1]])  # killed exactly between records: no end mark
    records, report, _ = read(path)
    assert len(records) == 3 and report.truncated and not report.clean_end and "cut short" in report.problem
    assert report.lost_bytes == 0


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
        assert report.records == 3 and report.corrupt_records == 0, cut
        assert report.truncated and not report.clean_end, cut
        assert report.lost_bytes == cut - last_start, cut


def test_truncated_inside_an_earlier_record(tmp_path):
    messages = message_frames(5)
    path = tmp_path / "a.rec"
    offsets = write(path, messages)
    path.write_bytes(path.read_bytes()[: offsets[2] + 20])
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


@pytest.mark.parametrize("byte", range(0, RECORD_HEAD))
@pytest.mark.parametrize("xor", [0x01, 0x80, 0xFF])
def test_a_damaged_record_head_loses_that_record_only(tmp_path, byte, xor):
    """Mark, length, body CRC or head CRC: the head's CRC catches it, the reader resynchronizes on
    the next record, and only the damaged one is lost (one bad length used to lose the rest)."""
    messages = message_frames(6)
    path = tmp_path / "a.rec"
    offsets = write(path, messages)
    corrupted = bytearray(path.read_bytes())
    corrupted[offsets[1] + byte] ^= xor
    path.write_bytes(corrupted)
    records, report, _ = read(path)
    assert records == [as_bytes(m) for i, m in enumerate(messages) if i != 1]
    assert report.corrupt_records == 1 and report.skipped_bytes == offsets[2] - offsets[1]
    assert report.clean_end and not report.truncated


@pytest.mark.parametrize("delta", [-1000, +1000, 2**31])
def test_one_bad_length_among_sixty_records(tmp_path, delta):
    messages = message_frames(60)
    path = tmp_path / "a.rec"
    offsets = write(path, messages)
    corrupted = bytearray(path.read_bytes())
    length_at = offsets[5] + 4
    (length,) = struct.unpack_from("<I", corrupted, length_at)
    struct.pack_into("<I", corrupted, length_at, (length + delta) % 2**32)
    path.write_bytes(corrupted)
    records, report, _ = read(path)
    assert len(records) == 59 and report.corrupt_records == 1 and report.clean_end


def test_consistent_crc_but_bad_frame_table_is_corrupt(tmp_path):
    path = tmp_path / "a.rec"
    write(path, message_frames(1))
    data = path.read_bytes()[:-END_BYTES]  # append records after the first, then a fresh end mark
    for body in (struct.pack("<3I", 2, 1, 5) + b"abc", struct.pack("<I", MAX_FRAMES + 1), struct.pack("<I", 2**32 - 1)):
        data += record_head(body) + body
    good = struct.pack("<2I", 1, 0)
    data += record_head(good) + good
    head = END_MARK + struct.pack("<I", 5)
    data += head + struct.pack("<I", zlib.crc32(head))
    path.write_bytes(data)
    records, report, _ = read(path)
    assert records == [as_bytes(message_frames(1)[0]), [b""]]
    assert report.corrupt_records == 3 and report.records == 2 and report.clean_end


def test_garbage_after_the_last_record_is_lost_bytes(tmp_path):
    path = tmp_path / "a.rec"
    offsets = write(path, message_frames(2))
    path.write_bytes(path.read_bytes()[: offsets[-1]] + b"\x00" * 40)
    records, report, _ = read(path)
    assert len(records) == 2 and report.lost_bytes == 40 and report.problem and not report.clean_end


def test_reading_twice_yields_nothing_more(tmp_path):
    path = tmp_path / "a.rec"
    write(path, message_frames(2))
    with RecordingReader(path) as reader:
        assert len(list(reader)) == 2
        assert list(reader) == []
        assert reader.report.records == 2


def test_a_writer_appends_to_an_existing_recording(tmp_path):
    path = tmp_path / "a.rec"
    messages = message_frames(5)
    write(path, messages[:3], {"run": 1})
    with RecordingWriter(path, {"run": 2}) as writer:
        assert writer.records == 3
        for frames in messages[3:]:
            writer.write(frames)
    records, report, info = read(path)
    assert records == [as_bytes(m) for m in messages] and report.clean_end and info["run"] == 1


def test_appending_after_a_kill_drops_the_record_cut_short(tmp_path):
    path = tmp_path / "a.rec"
    messages = message_frames(4)
    offsets = write(path, messages[:3])
    path.write_bytes(path.read_bytes()[: offsets[2] + 10])  # killed while writing the third record
    with RecordingWriter(path) as writer:
        writer.write(messages[3])
    records, report, _ = read(path)
    assert records == [as_bytes(m) for m in (messages[0], messages[1], messages[3])] and report.clean_end


def test_a_second_writer_is_refused_while_the_first_holds_the_file(tmp_path):
    path = tmp_path / "a.rec"
    with RecordingWriter(path) as first:
        first.write(message_frames(1)[0])
        with pytest.raises(RecordingError, match="locked"):
            RecordingWriter(path)
    assert read(path)[1].records == 1
    RecordingWriter(path).close()  # free again once the first has closed it


def test_an_existing_file_can_be_refused_instead_of_appended_to(tmp_path):
    path = tmp_path / "a.rec"
    write(path, message_frames(1))
    with pytest.raises(RecordingError, match="exists"):
        RecordingWriter(path, append=False)
    assert read(path)[1].records == 1


def test_the_writer_makes_the_recordings_folder(tmp_path):
    path = tmp_path / "runs" / "a" / "stream.lps"
    write(path, message_frames(1))
    assert read(path)[1].records == 1


def test_a_format_one_recording_is_still_read(tmp_path):
    """Format 1: magic ...\\x01, records without a head CRC, no end mark."""
    messages = [as_bytes(m) for m in message_frames(4)]
    header = msgpack.packb({"format_version": 1, "recorded_by": "old"})
    data = MAGIC_PREFIX + b"\x01" + struct.pack("<I", len(header)) + header
    starts = []
    for frames in messages:
        lengths = struct.pack(f"<{len(frames) + 1}I", len(frames), *map(len, frames))
        body = lengths + b"".join(frames)
        starts.append(len(data))
        data += struct.pack("<4sII", RECORD_MARK, len(body), zlib.crc32(body)) + body
    path = tmp_path / "old.rec"
    path.write_bytes(data)
    records, report, info = read(path)
    assert records == messages and info["recorded_by"] == "old" and not report.truncated and report.problem == ""
    corrupted = bytearray(data)
    corrupted[starts[1] + 4] ^= 0xFF  # a bad length: resynchronized by the next record's body CRC
    path.write_bytes(corrupted)
    records, report, _ = read(path)
    assert records == [messages[0], *messages[2:]] and report.corrupt_records == 1
    with pytest.raises(RecordingError, match="format 1"):
        RecordingWriter(path)


def header_file(header_bytes, declared_len=None, magic=MAGIC):
    length = len(header_bytes) if declared_len is None else declared_len
    return magic + struct.pack("<I", length) + header_bytes


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"L",
        MAGIC,
        MAGIC + b"\x00\x00",
        MAGIC_PREFIX + b"\x03" + struct.pack("<I", 1) + b"\x80",
        b"XXXXXXXX" + struct.pack("<I", 1) + b"\x80",
        header_file(b"\x80"),  # no format_version
        header_file(msgpack.packb({"format_version": 1})),  # disagrees with the magic
        header_file(msgpack.packb({"format_version": True})),
        header_file(msgpack.packb([1])),
        header_file(msgpack.packb(None)),
        header_file(b"\xc1"),
        header_file(b""),
        header_file(msgpack.packb({"format_version": 2}), declared_len=100),
        header_file(msgpack.packb({"format_version": 2}), declared_len=2**32 - 1),
        header_file(b"\x80" + b"\x00" * 70_000, declared_len=70_001),
        header_file(msgpack.packb({"format_version": 2}) + b"\x00"),  # trailing byte inside the header
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
