"""The recording file format (docs/SPEC.md §5): a file header, then one record per wire message.

Layout, all integers little-endian uint32::

    file   := MAGIC (8 bytes, b"LPKREC\\x00\\x01") header_len header(msgpack map) record*
    record := RECORD_MARK (4 bytes, b"LPR1") body_len crc32(body) body
    body   := n_frames frame_len[n_frames] frame_bytes...

A record holds the exact frames of one wire message. The reader stops cleanly at a
truncated tail and reports how many bytes were lost; a record whose CRC does not match
is skipped and counted. Sizes are checked against limits and the file size before any
allocation. ``docs/PROTOCOL.md`` is the prose form.
"""

from __future__ import annotations

import os
import reprlib
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack

MAGIC = b"LPKREC\x00\x01"
RECORD_MARK = b"LPR1"
FORMAT_VERSION = 1
MAX_FILE_HEADER_BYTES = 1 << 16
MAX_RECORD_BYTES = 1 << 30
MAX_FRAMES = 64

_U32 = struct.Struct("<I")
_RECORD_HEAD = struct.Struct("<4sII")


class RecordingError(ValueError):
    """The file is not a Linepack recording (bad magic or file header)."""


@dataclass
class RecordingReport:
    """What a reader saw. ``truncated``: the file ended inside a record; ``lost_bytes``:
    bytes after the last good record that could not be read as records."""

    records: int = 0
    corrupt_records: int = 0
    truncated: bool = False
    lost_bytes: int = 0
    problem: str = ""


class RecordingWriter:
    """Appends records to a new recording file. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        self.records = 0
        header = msgpack.packb({"format_version": FORMAT_VERSION, **(info or {})}, use_bin_type=True)
        if len(header) > MAX_FILE_HEADER_BYTES:
            raise ValueError("recording info is too large")
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(MAGIC + _U32.pack(len(header)) + header)

    def write(self, frames: Sequence[Any]) -> None:
        """Append one record holding ``frames`` (any bytes-like objects) exactly."""
        views = [memoryview(f.buffer if hasattr(f, "buffer") else f).cast("B") for f in frames]
        lengths = struct.pack(f"<{len(views) + 1}I", len(views), *(len(v) for v in views))
        crc = zlib.crc32(lengths)
        for view in views:
            crc = zlib.crc32(view, crc)
        body_len = len(lengths) + sum(len(v) for v in views)
        self._file.write(_RECORD_HEAD.pack(RECORD_MARK, body_len, crc))
        self._file.write(lengths)
        for view in views:
            self._file.write(view)
        self.records += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingReader:
    """Iterates over the records of a recording; see :attr:`report` afterwards.

    Iterating yields each good record's frames as a list of ``bytes``. Raises
    :class:`RecordingError` at open time if the file is not a recording.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.report = RecordingReport()
        self._file: BinaryIO = open(self.path, "rb")
        self._size = os.fstat(self._file.fileno()).st_size
        try:
            self.info = self._read_file_header()
        except Exception:
            self._file.close()
            raise

    def _read_file_header(self) -> dict[str, Any]:
        head = self._file.read(len(MAGIC) + _U32.size)
        if len(head) < len(MAGIC) + _U32.size or head[: len(MAGIC)] != MAGIC:
            raise RecordingError(f"{self.path} is not a Linepack recording (bad magic)")
        (header_len,) = _U32.unpack_from(head, len(MAGIC))
        if header_len > MAX_FILE_HEADER_BYTES or header_len > self._size - len(head):
            raise RecordingError(f"{self.path}: file header length {header_len} is invalid")
        try:
            info = msgpack.unpackb(self._file.read(header_len), raw=False, max_bin_len=MAX_FILE_HEADER_BYTES, max_ext_len=0)
        except Exception as error:
            raise RecordingError(f"{self.path}: file header is not msgpack ({error})") from None
        version = info.get("format_version") if isinstance(info, dict) else None
        if type(version) is not int or version != FORMAT_VERSION:
            raise RecordingError(f"{self.path}: unsupported recording format {reprlib.repr(info)}")
        return info

    def __iter__(self) -> Iterator[list[bytes]]:
        report = self.report
        while True:
            offset = self._file.tell()
            remaining = self._size - offset
            if remaining == 0:
                return
            head = self._file.read(_RECORD_HEAD.size)
            if len(head) < _RECORD_HEAD.size:
                self._stop(offset, truncated=True, problem="file ends inside a record header")
                return
            mark, body_len, crc = _RECORD_HEAD.unpack(head)
            if mark != RECORD_MARK or body_len > MAX_RECORD_BYTES or body_len < _U32.size:
                self._stop(offset, truncated=False, problem=f"no valid record at byte {offset}")
                return
            if body_len > remaining - _RECORD_HEAD.size:
                self._stop(offset, truncated=True, problem=f"last record needs {body_len} bytes, {remaining - _RECORD_HEAD.size} remain")
                return
            body = self._file.read(body_len)
            if zlib.crc32(body) != crc:
                report.corrupt_records += 1
                continue
            frames = _split_body(body)
            if frames is None:
                report.corrupt_records += 1
                continue
            report.records += 1
            yield frames

    def _stop(self, offset: int, truncated: bool, problem: str) -> None:
        self.report.truncated = truncated
        self.report.lost_bytes = self._size - offset
        self.report.problem = problem

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_body(body: bytes) -> list[bytes] | None:
    """The frames of a record body, or None if its frame table does not add up."""
    (n_frames,) = _U32.unpack_from(body, 0)
    table_end = _U32.size * (1 + n_frames)
    if n_frames > MAX_FRAMES or table_end > len(body):
        return None
    lengths = struct.unpack_from(f"<{n_frames}I", body, _U32.size)
    if table_end + sum(lengths) != len(body):
        return None
    frames, start = [], table_end
    for length in lengths:
        frames.append(body[start : start + length])
        start += length
    return frames
