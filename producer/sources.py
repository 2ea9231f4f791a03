"""The files of a corpus to prepare, read as a stream of chunks of whole lines.

``.txt`` files hold text; ``.jsonl`` files one JSON object a line, whose ``--text-field`` is a
document (its text, ending in a line break, becomes that many lines); ``.gz`` of either is
decompressed as it streams. :func:`chunks` cuts the stream into pieces of about ``chunk_bytes``
that end at a line break, so a worker tokenizes whole lines and no file is ever read whole.
"""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer.lines import CorpusError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
DEFAULT_MAX_LINE_BYTES = 4_000_000  # the longest line prepare holds (and tokenizer train reads), in bytes


@dataclass(frozen=True)
class Source:
    path: Path
    bytes: int  # on disk (compressed for .gz)

    @property
    def jsonl(self) -> bool:
        return self.path.name.endswith(JSONL_SUFFIXES)

    @property
    def gzipped(self) -> bool:
        return self.path.name.endswith(".gz")


@dataclass(frozen=True)
class Chunk:
    """Whole lines of one source: ``data`` starts at byte ``offset`` of its (decompressed)
    content, at line ``line`` (1-based)."""

    source: Path
    jsonl: bool
    offset: int
    line: int
    data: bytes


def _suffix_ok(path: Path, text_field: str | None) -> bool:
    return path.name.endswith(TEXT_SUFFIXES) or (text_field is not None and path.name.endswith(JSONL_SUFFIXES))


def list_sources(path: str | None, text_field: str | None) -> list[Source]:
    """The files of ``path`` (a file, or a folder read recursively in sorted order)."""
    if path is None:
        raise CorpusError("prepare needs --corpus PATH")
    root = Path(path)
    if root.is_file():
        files = [root]
        if root.name.endswith(JSONL_SUFFIXES) and text_field is None:
            raise CorpusError(f"{root} is JSON lines: name the field that holds the text with --text-field")
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and _suffix_ok(p, text_field))
        if not files:
            kinds = "text (.txt) or JSON lines (.jsonl, with --text-field)"
            raise CorpusError(f"corpus folder {root} holds no {kinds} files (.gz too)")
    else:
        raise CorpusError(f"corpus {root} does not exist")
    return [Source(file, file.stat().st_size) for file in files]


def chunks(files: list[Source], chunk_bytes: int, max_line_bytes: int, progress=None) -> Iterator[Chunk]:
    """Chunks of whole lines of every file in order; a file's last line gets a ``\\n`` if it lacks
    one. ``progress`` (a tqdm bar) advances by the bytes read from disk.

    No line longer than ``max_line_bytes`` is ever held: a text line is split into pieces of at
    most that many bytes (at UTF-8 character starts; the first split of each file is reported on
    stderr), a JSON line that long is refused (CorpusError naming the file, line and byte offset).
    So a chunk is at most ``chunk_bytes + max_line_bytes`` bytes (and a line break per piece)
    whatever the shape of the input. A truncated or damaged ``.gz`` is a CorpusError too."""
    for source in files:
        with open(source.path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if source.gzipped else raw
            carry, offset, line, on_disk = b"", 0, 1, 0
            cutter = _LineCutter(source, max_line_bytes)
            while True:
                block = _read(stream, chunk_bytes, source, offset + len(carry))
                if progress is not None:
                    position = raw.tell()
                    progress.update(position - on_disk)
                    on_disk = position
                if not block:
                    break
                data = carry + block
                end = data.rfind(b"\n") + 1
                carry = data[end:]
                whole, carry = cutter.cut(data[:end], carry, offset, line)
                if not whole:
                    continue
                yield Chunk(source.path, source.jsonl, offset, line, whole)
                offset += end + cutter.consumed
                line += data.count(b"\n", 0, end)
            if carry:
                yield Chunk(source.path, source.jsonl, offset, line, carry + b"\n")


def _read(stream, size: int, source: Source, offset: int) -> bytes:
    try:
        return stream.read(size)
    except (OSError, EOFError, zlib.error) as error:  # gzip: BadGzipFile, EOFError on a truncated member
        raise CorpusError(f"{source.path} is not a readable gzip file near byte offset {offset} of its content "
                          f"({type(error).__name__}: {error})") from None


class _LineCutter:
    """Splits the lines of one source longer than ``limit`` bytes (text) or refuses them (JSON)."""

    def __init__(self, source: Source, limit: int) -> None:
        self.source, self.limit = source, limit
        self.consumed = 0  # bytes of the carry moved into the whole lines by the last cut()
        self.reported = False

    def cut(self, whole: bytes, carry: bytes, offset: int, line: int) -> tuple[bytes, bytes]:
        """``(whole lines with every long one split, what is left of the carry)``: ``whole`` (from
        byte ``offset``, line ``line`` of the source) ends in a line break; while the carry (the
        start of a line, no break yet) is over the limit, pieces of it move into ``whole``."""
        self.consumed = 0
        starts = np.flatnonzero(np.frombuffer(whole, dtype=np.uint8) == ord("\n")) + 1
        lengths = np.diff(starts, prepend=0) - 1  # without the line break
        long = np.flatnonzero(lengths > self.limit).tolist()
        if long:
            self._too_long(offset + int(starts[long[0]] - lengths[long[0]] - 1), line + long[0])
            pieces, begin = [], 0
            for index in long:
                stop = int(starts[index]) - 1
                start = stop - int(lengths[index])
                pieces += [whole[begin:start], self._split(whole[start:stop])]
                begin = stop
            whole = b"".join([*pieces, whole[begin:]])
        if len(carry) > self.limit:
            self._too_long(offset + len(whole), line + len(starts))
            pieces = []
            while len(carry) > self.limit:
                cut = self._boundary(carry)
                pieces.append(carry[:cut] + b"\n")
                carry, self.consumed = carry[cut:], self.consumed + cut
            whole += b"".join(pieces)
        return whole, carry

    def _too_long(self, offset: int, line: int) -> None:
        if self.source.jsonl:
            raise CorpusError(f"{self.source.path}:{line}: the line at byte offset {offset} is longer than "
                              f"--max-line-bytes {self.limit}: a JSON line is never split")
        if not self.reported:
            self.reported = True
            print(f"prepare: {self.source.path}:{line}: the line at byte offset {offset} is longer than "
                  f"--max-line-bytes {self.limit}: split into pieces of at most that many bytes", file=sys.stderr)

    def _split(self, data: bytes) -> bytes:
        """``data`` (no line break) as pieces of at most ``limit`` bytes joined by line breaks."""
        pieces = []
        while len(data) > self.limit:
            cut = self._boundary(data)
            pieces.append(data[:cut])
            data = data[cut:]
        return b"\n".join([*pieces, data])

    def _boundary(self, data: bytes) -> int:
        """Where to cut ``data`` (longer than the limit): at most ``limit`` bytes, before a UTF-8
        character's first byte (up to 3 bytes back; invalid UTF-8 is cut at the limit)."""
        cut = self.limit
        while cut > self.limit - 3 and data[cut] & 0xC0 == 0x80:
            cut -= 1
        return cut if data[cut] & 0xC0 != 0x80 else self.limit


def _decode(chunk: Chunk) -> str:
    try:
        return chunk.data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"{chunk.source} is not UTF-8: undecodable byte 0x{chunk.data[error.start]:02x} "
                          f"at byte offset {chunk.offset + error.start}") from None


def chunk_text(chunk: Chunk, text_field: str | None) -> str:
    """The text of a chunk as whole lines (each ending in ``\\n``): the text itself, or for JSON
    lines each document's field (blank lines are skipped)."""
    text = _decode(chunk)
    if not chunk.jsonl:
        return text
    documents = []
    for number, line in enumerate(text.split("\n")[:-1], start=chunk.line):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError as error:
            raise CorpusError(f"{chunk.source}:{number}: not JSON ({error})") from None
        value = document.get(text_field) if isinstance(document, dict) else None
        if not isinstance(value, str):
            raise CorpusError(f"{chunk.source}:{number}: no text field {text_field!r}")
        if value:
            documents.append(value if value.endswith("\n") else value + "\n")
    return "".join(documents)


def progress_bar(total_bytes: int):
    """A tqdm bar in bytes (MB/s, ETA), quiet when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="prepare", disable=None,
                dynamic_ncols=True)
