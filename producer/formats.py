"""The file formats a corpus may come in, one class each in :data:`FORMATS`, and the
compressions around them in :data:`COMPRESSIONS` (the shape of MosaicML Streaming's reader
registry: adding a format is one class and one line here, and its test).

A file named ``NAME.FORMAT`` or ``NAME.FORMAT.COMPRESSION`` (``part-0.jsonl.zst``) is read front
to back as a stream of lines, UTF-8 bytes each ending in ``\\n`` (:meth:`Format.open`), which
:mod:`producer.sources` cuts into chunks; a worker turns a chunk's lines into text
(:meth:`Format.text`). So every format gets the same decode-error modes, ``--max-line-bytes``,
progress and manifest, and ``prepare``, ``tokenizer train`` and a text corpus read in memory
(:func:`producer.corpus.read_text`) read every format alike.

========  ====================================================================================
.txt      text: each line is a line
.jsonl    one JSON object a line; its ``--text-field`` holds a document, whose text (ending in a
          line break) becomes that many lines; a JSON line is never split
.parquet  a table whose ``--text-field`` column (string or binary) holds the documents (as
          .jsonl), read a record batch at a time (``pyarrow``); a missing value is an error
.gz .zst  around .txt or .jsonl: decompressed as the file streams (``zstandard`` for .zst)
========  ====================================================================================

``pyarrow`` and ``zstandard`` come with the ``formats`` extra; without them such a file is an
error naming it and the extra.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from producer.lines import CorpusError

EXTRA = "formats"  # the optional dependencies of pyproject.toml that hold pyarrow and zstandard
PARQUET_BATCH_ROWS = 256  # documents decoded at a time: a batch holds this many, whatever the row group's size
PARQUET_BUFFER_BYTES = 1 << 20  # Parquet pages are read through a buffer this large, not a column chunk whole
# The --corpus and --text-field of prepare and tokenizer train.
CORPUS_HELP = "a .txt, .jsonl or .parquet file (.txt and .jsonl also .gz or .zst), or a folder of them"
TEXT_FIELD_HELP = "the field of each .jsonl line, or the .parquet column, that holds the text"


class Readable:
    """What a format's :meth:`Format.open` returns: ``read(size)``, about ``size`` bytes of whole
    or partial lines (fewer only at the end; ``b""`` after it)."""

    def read(self, size: int) -> bytes:
        raise NotImplementedError


class Entry:
    """A line of a registry: the name ending ``suffix``, the ``name`` errors use, and the package
    of the ``formats`` extra it needs (``module``; None: the standard library's)."""

    suffix: ClassVar[str]
    name: ClassVar[str]
    module: ClassVar[str | None] = None

    @classmethod
    def check_installed(cls, path: Path) -> None:
        """Raises CorpusError naming ``path`` and the extra when ``module`` is not installed."""
        if cls.module is not None and importlib.util.find_spec(cls.module) is None:
            raise CorpusError(f"{path}: reading {cls.suffix} files needs the {cls.module} package of Linepack's "
                              f"{EXTRA!r} extra (pip install -e '.[{EXTRA}]' in the checkout, or pip install {cls.module})")

    def errors(self) -> tuple[type[BaseException], ...]:
        """What reading a damaged or truncated file raises (besides CorpusError)."""
        return ()


class Compression(Entry):
    """A compression around a format's file, undone as the file streams."""

    def open(self, raw: BinaryIO) -> BinaryIO:
        raise NotImplementedError


class Gzip(Compression):
    suffix, name = ".gz", "gzip"

    def open(self, raw: BinaryIO) -> BinaryIO:
        return gzip.GzipFile(fileobj=raw)

    def errors(self) -> tuple[type[BaseException], ...]:
        return (OSError, EOFError, zlib.error)  # BadGzipFile is an OSError; a truncated member raises EOFError


class Zstd(Compression):
    suffix, name, module = ".zst", "zstd", "zstandard"

    def open(self, raw: BinaryIO) -> BinaryIO:
        import zstandard

        from producer.zstd_frames import FrameCheck

        return zstandard.ZstdDecompressor().stream_reader(FrameCheck(raw), read_across_frames=True)

    def errors(self) -> tuple[type[BaseException], ...]:
        import zstandard

        return (zstandard.ZstdError, EOFError, ValueError)  # FrameCheck raises EOFError and ValueError


class Format(Entry):
    """A file format: how it reads, and what its text is."""

    field: ClassVar[bool] = False  # its text is a field of each record, named by --text-field
    compressible: ClassVar[bool] = True  # read front to back, so it may come as .gz or .zst
    # A line is one record: a line longer than --max-line-bytes is refused (not split), and one
    # left out by --decode-errors skip-line leaves an empty line, so that line numbers hold.
    line_records: ClassVar[bool] = False

    def open(self, stream: BinaryIO, path: Path, text_field: str | None) -> BinaryIO | Readable:
        """The file (``stream``, decompressed) as a stream of lines."""
        return stream

    def text(self, text: str, path: Path, first_line: int, text_field: str | None) -> str:
        """The text of decoded lines (line ``first_line`` on of ``path``), as lines."""
        return text


class TextLines(Format):
    suffix, name = ".txt", "text"


class JsonLines(Format):
    suffix, name, field, line_records = ".jsonl", "JSON lines", True, True

    def text(self, text: str, path: Path, first_line: int, text_field: str | None) -> str:
        """Each document's field (blank lines are skipped), ending in a line break."""
        documents = []
        for number, line in enumerate(text.split("\n")[:-1], start=first_line):
            if not line.strip():
                continue
            try:
                document = json.loads(line)
            except ValueError as error:
                raise CorpusError(f"{path}:{number}: not JSON ({error})") from None
            value = document.get(text_field) if isinstance(document, dict) else None
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{number}: no text field {text_field!r}")
            if value:
                documents.append(value if value.endswith("\n") else value + "\n")
        return "".join(documents)


class Parquet(Format):
    suffix, name, module, field, compressible = ".parquet", "Parquet", "pyarrow", True, False

    def open(self, stream: BinaryIO, path: Path, text_field: str | None) -> Readable:
        return _ParquetLines(stream, path, text_field)

    def errors(self) -> tuple[type[BaseException], ...]:
        import pyarrow

        return (pyarrow.ArrowException, OSError)


class _ParquetLines(Readable):
    """The documents of one column of a Parquet file as lines: each non-empty value, ending in a
    line break; :data:`PARQUET_BATCH_ROWS` rows decoded at a time, pages read through a buffer."""

    def __init__(self, stream: BinaryIO, path: Path, text_field: str | None) -> None:
        import pyarrow
        import pyarrow.parquet

        self.path, self.text_field, self.row = path, text_field, 0
        # Arrow's default allocator (mimalloc) keeps what the batches freed: the C library's own
        # gives it back (a 200 MB file: 42 MB above the import at the peak, not 75 MB).
        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
        # pre_buffer (pyarrow's default) would read each row group's column chunk whole.
        self.file = pyarrow.parquet.ParquetFile(stream, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
        if text_field not in self.file.schema_arrow.names:
            raise CorpusError(f"{path}: no column {text_field!r} (its columns: {', '.join(self.file.schema_arrow.names)[:300]})")
        self.batches: Iterator[Any] = self.file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field])
        self.pending = b""

    def read(self, size: int) -> bytes:
        pieces, length = [self.pending], len(self.pending)
        while length < size:
            batch = next(self.batches, None)
            if batch is None:
                break
            piece = self._lines(batch.column(0))
            pieces.append(piece)
            length += len(piece)
        data = b"".join(pieces)
        self.pending = data[size:]
        return data[:size]

    def _lines(self, column: Any) -> bytes:
        """The values of one batch's column as lines, joined (vectorized in Arrow)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        first, self.row = self.row, self.row + len(column)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            raise CorpusError(f"{self.path}: column {self.text_field!r} holds {column.type}, not text")
        if column.null_count:
            row = first + pc.index(column.is_null(), True).as_py()
            raise CorpusError(f"{self.path}: row {row:,}: no text in column {self.text_field!r} (null)")
        values = column.cast(pa.large_binary())
        values = values.filter(pc.greater(pc.binary_length(values), 0))
        break_ = pa.scalar(b"\n", pa.large_binary())
        ended = pc.if_else(pc.ends_with(values, pattern="\n"), values,
                           pc.binary_join_element_wise(values, break_, pa.scalar(b"", pa.large_binary())))
        if not len(ended):
            return b""
        # The values of a large_binary array lie one after another in its data buffer, between two offsets.
        _, offsets, data = ended.buffers()
        bounds = np.frombuffer(offsets, dtype=np.int64)[[ended.offset, ended.offset + len(ended)]]
        return data[int(bounds[0]):int(bounds[1])].to_pybytes()


# The registries: a file is NAME + a format's suffix (+ a compression's suffix, if the format is compressible).
FORMATS: dict[str, Format] = {fmt.suffix: fmt for fmt in (TextLines(), JsonLines(), Parquet())}
COMPRESSIONS: dict[str, Compression] = {kind.suffix: kind for kind in (Gzip(), Zstd())}


def format_of(path: Path) -> tuple[Format | None, Compression | None]:
    """The format (None: no format's name) and compression (None: none) of a file, by its name.
    Raises CorpusError for a compressed file of a format that is read otherwise than front to back."""
    name = path.name
    compression = next((kind for suffix, kind in COMPRESSIONS.items() if name.endswith(suffix)), None)
    if compression is not None:
        name = name[: -len(compression.suffix)]
    fmt = next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), None)
    if fmt is not None and compression is not None and not fmt.compressible:
        raise CorpusError(f"{path}: {fmt.name} files are compressed inside; {compression.suffix} around one is not read")
    return fmt, compression
