"""The files of a corpus, read as a stream of chunks of whole lines: by ``prepare``,
``tokenizer train`` and (for a text corpus tokenized in memory) ``run`` and ``record`` alike.

Each file is read by its format (:mod:`producer.formats`: ``.txt``, ``.jsonl`` and ``.parquet``,
whose ``--text-field`` holds the documents; ``.gz`` and ``.zst`` of the first two) as a stream of
lines. :func:`chunks` cuts the stream into pieces of about ``chunk_bytes`` that end at a line
break, so a worker tokenizes whole lines and no file is ever read whole; no line longer than
``--max-line-bytes`` is ever held (a text line is split, a JSON line refused).

Text must be UTF-8. ``--decode-errors`` (:data:`DECODE_ERRORS`) says what to do with bytes that
are not: ``strict`` (the default) stops with the file and byte offset; ``replace`` writes each
undecodable sequence as U+FFFD; ``skip-line`` leaves out every line (a ``.jsonl`` document) that
holds one. :func:`chunk_text` counts what it replaced or skipped.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.formats import FORMATS, Compression, Format, format_of
from producer.lines import CorpusError
from shared.settings import setting

READ_CHUNK_BYTES = 1 << 22  # bytes per chunk when one process reads the whole corpus
PROGRESS_EVERY_S = 5.0  # seconds between progress lines when stderr is not a terminal
DEFAULT_MAX_LINE_BYTES = 4_000_000  # the longest line prepare holds (and tokenizer train reads), in bytes
DECODE_ERRORS = ("strict", "replace", "skip-line")
REPLACEMENT = "\ufffd"


def decode_errors_setting() -> Any:
    """The ``--decode-errors`` field of every command that reads a corpus to prepare it."""
    return setting("strict", "bytes that are not UTF-8: strict stops at the first; replace writes U+FFFD for each; "
                             "skip-line leaves out each line (.jsonl document) that holds one", choices=DECODE_ERRORS)


@dataclass(frozen=True)
class Text:
    """Decoded text and what decoding changed: ``replaced`` undecodable byte sequences written as
    U+FFFD, ``skipped_lines`` lines (``.jsonl``: documents) left out."""

    text: str
    replaced: int = 0
    skipped_lines: int = 0


@dataclass(frozen=True)
class Source:
    """One file of the corpus: ``bytes`` on disk (compressed, for a compressed file), read by
    ``format`` after ``compression`` (None: none); ``text_field`` is ``--text-field``."""

    path: Path
    bytes: int
    format: Format
    compression: Compression | None = None
    text_field: str | None = None

    def open(self, raw) -> Any:
        """The file (``raw``, opened for reading bytes) as a stream of lines: ``read(size)``."""
        stream = raw if self.compression is None else self.compression.open(raw)
        return self.format.open(stream, self.path, self.text_field)

    def errors(self) -> tuple[type[BaseException], ...]:
        """What reading a damaged file raises (its format's and its compression's)."""
        return self.format.errors() + (() if self.compression is None else self.compression.errors())


@dataclass(frozen=True)
class Chunk:
    """Whole lines of one source, read by ``format``: ``data`` starts at byte ``offset`` of its
    (decompressed) content, at line ``line`` (1-based)."""

    source: Path
    format: Format
    offset: int
    line: int
    data: bytes


def _source(path: Path, text_field: str | None, named: bool) -> Source | None:
    """The source at ``path``; None when no format's name ends it or its format needs a
    ``--text-field`` that is not given. A file given by name (``named``) is text unless its name
    says otherwise, and is never passed over."""
    fmt, compression = format_of(path)
    if fmt is None:
        if not named:
            return None
        fmt = FORMATS[".txt"]
    if fmt.field and text_field is None:
        if named:
            raise CorpusError(f"{path} is {fmt.name}: name the field that holds the text with --text-field")
        return None
    for needs in (fmt, compression):
        if needs is not None:
            needs.check_installed(path)
    return Source(path, path.stat().st_size, fmt, compression, text_field)


def list_sources(path: str | None, text_field: str | None) -> list[Source]:
    """The files of ``path`` (a file, or a folder read recursively in sorted order)."""
    if path is None:
        raise CorpusError("no --corpus PATH given")
    root = Path(path)
    if root.is_file():
        return [_source(root, text_field, named=True)]
    if not root.is_dir():
        raise CorpusError(f"corpus {root} does not exist")
    files = [_source(file, text_field, named=False) for file in sorted(root.rglob("*")) if file.is_file()]
    found = [source for source in files if source is not None]
    if not found:
        kinds = "text (.txt), JSON lines (.jsonl) or Parquet (.parquet) files (the last two with --text-field)"
        raise CorpusError(f"corpus folder {root} holds no {kinds}; .gz and .zst of .txt and .jsonl too")
    return found


def chunks(files: list[Source], chunk_bytes: int, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
           progress=None) -> Iterator[Chunk]:
    """Chunks of whole lines of every file in order; a file's last line gets a ``\\n`` if it lacks
    one. ``progress`` (a tqdm bar) advances by the bytes read from disk.

    No line longer than ``max_line_bytes`` is ever held: a text line is split into pieces of at
    most that many bytes (at UTF-8 character starts; the first split of each file is reported on
    stderr), a JSON line that long is refused (CorpusError naming the file, line and byte offset).
    So a chunk is at most ``chunk_bytes + max_line_bytes`` bytes (and a line break per piece)
    whatever the shape of the input. A truncated or damaged compressed file or Parquet file is a
    CorpusError too."""
    for source in files:
        with open(source.path, "rb") as raw:
            carry, offset, line, on_disk = b"", 0, 1, 0
            stream = _call(source.open, source, 0, raw)
            cutter = _LineCutter(source, max_line_bytes)
            while True:
                block = _call(stream.read, source, offset + len(carry), chunk_bytes)
                if progress is not None:
                    position = max(on_disk, min(raw.tell(), source.bytes)) if block else source.bytes
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
                yield Chunk(source.path, source.format, offset, line, whole)
                offset += end + cutter.consumed
                line += data.count(b"\n", 0, end)
            if carry:
                yield Chunk(source.path, source.format, offset, line, carry + b"\n")


def _call(read, source: Source, offset: int, *args: Any) -> Any:
    """``read(*args)``; a damaged file's error as a CorpusError naming it and the ``offset`` of its content."""
    try:
        return read(*args)
    except CorpusError:
        raise
    except source.errors() as error:
        kind = source.format.name if source.compression is None else source.compression.name
        raise CorpusError(f"{source.path} is not a readable {kind} file near byte offset {offset} of its content "
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
        if self.source.format.line_records:
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


def decode(data: bytes, source: Path, offset: int, decode_errors: str, keep_line_numbers: bool) -> Text:
    """UTF-8 ``data`` (whole lines, each ending in ``\\n``; at byte ``offset`` of ``source``) as text,
    by ``decode_errors``. A skipped line leaves an empty line behind when ``keep_line_numbers``.
    Raises CorpusError naming the byte and its offset under ``strict``."""
    try:
        return Text(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        if decode_errors == "strict":
            raise CorpusError(f"{source} is not UTF-8: undecodable byte 0x{data[error.start]:02x} at byte offset "
                              f"{offset + error.start} (prepare and tokenizer train read on with --decode-errors replace "
                              f"or skip-line)") from None
    if decode_errors == "replace":
        text = data.decode("utf-8", "replace")
        return Text(text, replaced=text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8")))
    lines, skipped = [], 0
    for line in data.split(b"\n")[:-1]:
        try:
            lines.append(line.decode("utf-8") + "\n")
        except UnicodeDecodeError:
            skipped += 1
            if keep_line_numbers:
                lines.append("\n")
    return Text("".join(lines), skipped_lines=skipped)


def chunk_text(chunk: Chunk, text_field: str | None, decode_errors: str = "strict") -> Text:
    """The text of a chunk as whole lines (each ending in ``\\n``), by its format (a ``.jsonl``
    chunk: each document's field); decoded by ``decode_errors``."""
    decoded = decode(chunk.data, chunk.source, chunk.offset, decode_errors, keep_line_numbers=chunk.format.line_records)
    return dataclasses.replace(decoded, text=chunk.format.text(decoded.text, chunk.source, chunk.line, text_field))


class ProgressLines:
    """Progress as log lines, for a stderr that is not a terminal (a log file, ``docker logs``):
    one line every ``every_s`` seconds with the bytes read of ``total_bytes``, MB/s, the ETA and
    the fields of :meth:`set_postfix`. The part of tqdm's interface that the readers use."""

    def __init__(self, total_bytes: int, desc: str, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_bytes
        self.desc = desc
        self.every_s = every_s
        self.clock = clock
        self.done = 0
        self.postfix: dict[str, str] = {}
        self._started = clock()
        self._next = self._started + every_s

    def update(self, n: int) -> None:
        """``n`` more bytes read; a line when ``every_s`` seconds have passed since the last."""
        self.done += n
        now = self.clock()
        if now >= self._next:
            self._next = now + self.every_s
            elapsed = max(now - self._started, 1e-9)
            rate = self.done / elapsed
            eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "?"
            fields = "".join(f", {name} {value}" for name, value in self.postfix.items())
            print(f"{self.desc}: {self.done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB "
                  f"({100 * self.done / max(self.total, 1):.0f} %), {rate / 1e6:.1f} MB/s, ETA {eta}{fields}",
                  file=sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = False, **fields: str) -> None:
        """Fields shown at the end of the next line (``refresh`` is tqdm's; a line waits its turn)."""
        self.postfix = fields

    def close(self) -> None:
        """Nothing to tidy: the caller's summary line follows."""


def progress_bar(total_bytes: int, desc: str, terminal_bar: bool = True):
    """Progress in bytes: a tqdm bar (MB/s, ETA) on a terminal (none when ``terminal_bar`` is
    False: the caller has its own), else :class:`ProgressLines` every :data:`PROGRESS_EVERY_S` s."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        return ProgressLines(total_bytes, desc, PROGRESS_EVERY_S)
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not terminal_bar,
                dynamic_ncols=True)
