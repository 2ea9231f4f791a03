"""The recording file format (docs/SPEC.md §5, docs/PROTOCOL.md §8): a header, records, an end mark.

Format 2, all integers little-endian uint32::

    file   := MAGIC header_len header record* end?
    MAGIC  := b"LPKREC\\x00" version          (one byte: 2; format 1 files have 1)
    header := msgpack map of header_len bytes: format_version (= the magic's version byte) and
              free-form information about who recorded it
    record := RECORD_MARK body_len body_crc head_crc body
    end    := END_MARK records crc32(END_MARK records)
    body   := n_frames frame_len[n_frames] frame_bytes...

``head_crc`` is the CRC-32 of the 12 bytes before it (mark, length, body CRC), so a damaged length
is detected before it is believed; ``body_crc`` covers the body. A damaged record is skipped and
the reader **resynchronizes** on the next record mark whose head and body check out, reporting the
bytes skipped. A file without an end mark was cut short (its recorder was killed, or is still
writing); one whose end mark is there ended cleanly. Format 1 files (no head CRC, no end mark)
are still read, resynchronizing by the body CRC alone.

A writer appends to an existing recording (its end mark removed, then written anew on close) and
holds an exclusive lock on the file, so a second writer is refused with a clear error instead of
interleaving its records. It refuses a record its reader would reject (more than
:data:`MAX_FRAMES` frames, a body over :data:`MAX_RECORD_BYTES`).
"""

from __future__ import annotations

import fcntl
import os
import reprlib
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack

MAGIC_PREFIX = b"LPKREC\x00"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
RECORD_MARK = b"LPR1"
END_MARK = b"LPRE"
MAX_FILE_HEADER_BYTES = 1 << 16
MAX_RECORD_BYTES = 1 << 30
MAX_FRAMES = 64
RESYNC_FIRST_READ = 1 << 12  # bytes read first while looking for the next record mark (then doubling)
RESYNC_READ = 1 << 20  # ... up to this many at a time

_U32 = struct.Struct("<I")
_HEAD_V1 = struct.Struct("<4sII")  # mark, body_len, body_crc
_HEAD_V2 = struct.Struct("<4sIII")  # mark, body_len, body_crc, head_crc
_END = struct.Struct("<4sII")  # mark, records, crc


class RecordingError(ValueError):
    """The file is not a Linepack recording (bad magic or file header), or cannot be written."""


@dataclass
class RecordingReport:
    """What a reader saw. ``corrupt_records``: records skipped for a bad CRC or frame table;
    ``skipped_bytes``: bytes passed over while resynchronizing; ``truncated``: the file ends
    inside a record (or, format 2, has no end mark); ``lost_bytes``: bytes at the end that could
    not be read as records; ``clean_end``: the end mark was there (format 2)."""

    records: int = 0
    corrupt_records: int = 0
    skipped_bytes: int = 0
    truncated: bool = False
    lost_bytes: int = 0
    clean_end: bool = False
    problem: str = ""


def _frame_table(frames: Sequence[Any]) -> tuple[list[memoryview], bytes]:
    views = [memoryview(f.buffer if hasattr(f, "buffer") else f).cast("B") for f in frames]
    if not 1 <= len(views) <= MAX_FRAMES:
        raise RecordingError(f"a record holds 1..{MAX_FRAMES} frames, not {len(views)}")
    lengths = struct.pack(f"<{len(views) + 1}I", len(views), *(len(v) for v in views))
    if len(lengths) + sum(len(v) for v in views) > MAX_RECORD_BYTES:
        raise RecordingError(f"a record body is at most {MAX_RECORD_BYTES} bytes")
    return views, lengths


class RecordingWriter:
    """Writes records to a recording file, appending when it exists. Use as a context manager.

    Args:
        path: the file; its folder is created when missing.
        info: free-form header information of a new file (``format_version`` is the writer's).
        append: continue an existing recording (the default); False refuses an existing file.
    Raises:
        RecordingError when the file is another writer's (locked), is not a recording, or exists
        and ``append`` is False.
    """

    def __init__(self, path: str | os.PathLike, info: dict[str, Any] | None = None, append: bool = True) -> None:
        self.path = os.fspath(path)
        self.records = 0
        info = dict(info or {})
        if "format_version" in info:
            raise RecordingError("format_version is the writer's to set")
        header = msgpack.packb({**info, "format_version": FORMAT_VERSION}, use_bin_type=True)
        if len(header) > MAX_FILE_HEADER_BYTES:
            raise RecordingError("recording info is too large")
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._file: BinaryIO = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.close()
            raise RecordingError(f"{self.path} is being written by another process (locked): give each writer its own file") from None
        try:
            self._open(header, append)
        except BaseException:
            self._file.close()
            raise

    def _open(self, header: bytes, append: bool) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            self._file.write(MAGIC_PREFIX + bytes([FORMAT_VERSION]) + _U32.pack(len(header)) + header)
            return
        if not append:
            raise RecordingError(f"{self.path} exists: refusing to overwrite a recording")
        reader = RecordingReader(self.path)
        try:
            if reader.format != FORMAT_VERSION:
                raise RecordingError(f"{self.path} is a format {reader.format} recording: append to a new file instead")
            self.records = sum(1 for _ in reader)
            end = reader.good_end
        finally:
            reader.close()
        self._file.truncate(end)  # drops the old end mark, or a record cut short
        self._file.seek(end)

    def write(self, frames: Sequence[Any]) -> None:
        """Append one record holding ``frames`` (any bytes-like objects) exactly."""
        views, lengths = _frame_table(frames)
        crc = zlib.crc32(lengths)
        for view in views:
            crc = zlib.crc32(view, crc)
        body_len = len(lengths) + sum(len(v) for v in views)
        head = _HEAD_V1.pack(RECORD_MARK, body_len, crc)
        self._file.write(head + _U32.pack(zlib.crc32(head)))
        self._file.write(lengths)
        for view in views:
            self._file.write(view)
        self.records += 1

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        """Writes the end mark, flushes to disk, releases the lock. Idempotent."""
        if self._file.closed:
            return
        head = END_MARK + _U32.pack(self.records)
        self._file.write(head + _U32.pack(zlib.crc32(head)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingReader:
    """Iterates over the good records of a recording; see :attr:`report` afterwards.

    Iterating yields each good record's frames as a list of ``bytes``. Raises
    :class:`RecordingError` at open time if the file is not a recording. ``good_end`` is the
    offset just after the last good record (where a writer appends).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.report = RecordingReport()
        self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self._size = os.fstat(self._file.fileno()).st_size
        try:
            self.format, self.info = self._read_file_header()
        except Exception:
            self._file.close()
            raise
        self.good_end = self._file.tell()
        self.record_offset = -1  # where the record last yielded starts, for read_at

    def read_at(self, offset: int) -> list[bytes]:
        """The frames of the good record at ``offset`` (a :attr:`record_offset` seen while
        iterating); RecordingError if it no longer checks out (the file changed)."""
        frames, why, _ = self._record_at(offset, _HEAD_V2 if self.format == 2 else _HEAD_V1)
        if frames is None:
            raise RecordingError(f"{self.path}: the record at byte {offset} no longer checks out ({why})")
        return frames

    def _read_file_header(self) -> tuple[int, dict[str, Any]]:
        head = self._file.read(len(MAGIC_PREFIX) + 1 + _U32.size)
        if len(head) < len(MAGIC_PREFIX) + 1 + _U32.size or head[: len(MAGIC_PREFIX)] != MAGIC_PREFIX:
            raise RecordingError(f"{self.path} is not a Linepack recording (bad magic)")
        version = head[len(MAGIC_PREFIX)]
        if version not in READABLE_FORMATS:
            raise RecordingError(f"{self.path}: recording format {version}, this version reads {list(READABLE_FORMATS)}")
        (header_len,) = _U32.unpack_from(head, len(MAGIC_PREFIX) + 1)
        if header_len > MAX_FILE_HEADER_BYTES or header_len > self._size - len(head):
            raise RecordingError(f"{self.path}: file header length {header_len} is invalid")
        try:
            info = msgpack.unpackb(self._file.read(header_len), raw=False, max_bin_len=MAX_FILE_HEADER_BYTES, max_ext_len=0)
        except Exception as error:
            raise RecordingError(f"{self.path}: file header is not msgpack ({error})") from None
        if _depth(info) > 32:
            raise RecordingError(f"{self.path}: file header is nested too deeply")
        if not isinstance(info, dict) or info.get("format_version") != version or type(info.get("format_version")) is not int:
            raise RecordingError(f"{self.path}: file header {reprlib.repr(info)} does not say format {version}")
        return version, info

    def __iter__(self) -> Iterator[list[bytes]]:
        head_struct = _HEAD_V2 if self.format == 2 else _HEAD_V1
        while True:
            offset = self._file.tell()
            if offset == self._size:
                cut = self.format == 2
                self._finish(offset, truncated=cut, problem="no end mark: the recording was cut short" if cut else "")
                return
            if self.format == 2 and self._at_end_mark(offset):
                self.report.clean_end = True
                self._finish(offset, truncated=False, problem="")
                return
            frames, why, following = self._record_at(offset, head_struct)
            if frames is not None:
                self.record_offset = offset
                self.report.records += 1
                self.good_end = self._file.tell()
                yield frames
                continue
            if why == "cut short":
                self._finish(offset, truncated=True, problem="the last record was cut short")
                return
            self.report.corrupt_records += 1
            if following is None:  # the head itself is damaged: look for the next record mark
                following = self._next_record(offset + 1, head_struct)
                if following is None:
                    self._finish(offset, truncated=why == "past the end", problem=f"{why} at byte {offset}; no valid record after it")
                    return
                self.report.skipped_bytes += following - offset
            self._file.seek(following)

    def _at_end_mark(self, offset: int) -> bool:
        self._file.seek(offset)
        end = self._file.read(_END.size)
        self._file.seek(offset)
        if len(end) != _END.size or end[:4] != END_MARK or zlib.crc32(end[:8]) != _END.unpack(end)[2]:
            return False
        self._file.seek(offset + _END.size)
        return True

    def _record_at(self, offset: int, head_struct: struct.Struct) -> tuple[list[bytes] | None, str, int | None]:
        """The frames of the record at ``offset`` (the file left after it), or None, why not, and
        where the next record starts when the head could be believed (None: it could not)."""
        self._file.seek(offset)
        head = self._file.read(head_struct.size)
        if len(head) < head_struct.size:
            return None, "cut short" if head[: len(RECORD_MARK)] == RECORD_MARK[: len(head)] else "no record head", None
        mark, body_len, crc, *head_crc = head_struct.unpack(head)
        if mark != RECORD_MARK or (head_crc and zlib.crc32(head[:12]) != head_crc[0]):
            return None, "no valid record head", None
        if not _U32.size <= body_len <= MAX_RECORD_BYTES:
            return None, "an impossible record length", None
        if body_len > self._size - offset - head_struct.size:
            # Format 2: the head's CRC holds, so the length is true and the file was cut short.
            return None, "cut short" if head_crc else "past the end", None
        body = self._file.read(body_len)
        frames = _split_body(body) if zlib.crc32(body) == crc else None
        if frames is None:
            # Format 1 has no head CRC, so a bad body may mean a bad length: resynchronize instead.
            following = offset + head_struct.size + body_len if head_crc else None
            return None, "a record whose CRC or frame table is wrong", following
        return frames, "", None

    def _next_record(self, start: int, head_struct: struct.Struct) -> int | None:
        """The offset of the next record at or after ``start`` that checks out, or whose head
        checks out (format 2: a true record boundary), or of the end mark; None when there is none.

        The file is scanned in windows that start small and double (to :data:`RESYNC_READ`), so a
        resync near the next record reads little, whatever the file holds."""
        position, window_size = start, RESYNC_FIRST_READ
        while position < self._size:
            self._file.seek(position)
            window = self._file.read(min(window_size + len(RECORD_MARK), self._size - position))
            candidates = sorted(
                (found, mark)
                for mark in ((RECORD_MARK, END_MARK) if self.format == 2 else (RECORD_MARK,))
                for found in _occurrences(window, mark, window_size)
            )
            for found, mark in candidates:
                candidate = position + found
                if mark == END_MARK:
                    if self._at_end_mark(candidate):
                        return candidate
                    continue
                frames, _, following = self._record_at(candidate, head_struct)
                if frames is not None or following is not None:
                    return candidate
            position += window_size
            window_size = min(2 * window_size, RESYNC_READ)
        return None

    def _finish(self, offset: int, truncated: bool, problem: str) -> None:
        self.report.truncated = truncated
        self.report.lost_bytes = 0 if self.report.clean_end else self._size - offset
        self.report.problem = problem

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _occurrences(window: bytes, mark: bytes, limit: int) -> Iterator[int]:
    """Offsets below ``limit`` where ``mark`` starts in ``window``."""
    found = window.find(mark)
    while found != -1 and found < limit:
        yield found
        found = window.find(mark, found + 1)


def _depth(value: Any) -> int:
    """How deeply lists and maps nest in ``value`` (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= 33:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _split_body(body: bytes) -> list[bytes] | None:
    """The frames of a record body, or None if its frame table does not add up."""
    (n_frames,) = _U32.unpack_from(body, 0)
    table_end = _U32.size * (1 + n_frames)
    if not 1 <= n_frames <= MAX_FRAMES or table_end > len(body):
        return None
    lengths = struct.unpack_from(f"<{n_frames}I", body, _U32.size)
    if table_end + sum(lengths) != len(body):
        return None
    frames, start = [], table_end
    for length in lengths:
        frames.append(body[start : start + length])
        start += length
    return frames
