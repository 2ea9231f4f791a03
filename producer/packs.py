"""The tables a line-packed corpus is read by, built once (docs/SPEC.md §2.3, §2.8): each line's
row length (the content tokens of the row that starts there) and the packs of an epoch.

Every line packer locates a row by its row length (:func:`row_lengths`, one sorted pass over the
lines). Epoch sampling shuffles the greedy packs of the train lines (each pack starts at the line
after the previous pack's last, so every line is in exactly one): a Python step per pack over
vectorized pieces of lines. A corpus of up to :data:`IN_MEMORY_PACKS_MAX_LINES` lines keeps its
tables in memory (a few MB at most). A larger one (a prepared, memory-mapped corpus of tens of
millions of lines, whose tables would be hundreds of MB in every producer) has them written once
to cache files named by the corpus (fingerprint and tokenizer), the split, the packing and the
block size, and memory-mapped, so every producer on a host shares one copy through the page cache
and a producer's own memory stays flat in the corpus size (as Megatron-LM caches its shuffle
index). The cache folder is ``$LINEPACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/linepack``, else
``~/.cache/linepack``; a file is written under a temporary name and renamed, so producers racing
to build it agree. Fixed packing needs no table: pack i starts at token ``i * block_size``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from producer.lines import CorpusError, Lines
from producer.packing import LENGTH_DTYPE, FixedPacker, LinePacker, length_pieces, lengths_in_memory
from producer.prepared import MappedArray, drop_from_page_cache

IN_MEMORY_PACKS_MAX_LINES = 1 << 20
TABLES_VERSION = "v1"  # in every cache file's name: a table whose meaning changes gets new files
CACHE_ENV = "LINEPACK_CACHE_DIR"
PACK_DTYPE = np.dtype("<i8")


class FixedPacks:
    """The packs of fixed packing, computed: pack i starts at token ``i * block_size``."""

    def __init__(self, n_tokens: int, block_size: int) -> None:
        self.block_size = block_size
        self.count = -(-n_tokens // block_size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(positions, dtype=np.int64) * self.block_size


class MappedTable:
    """A 1-D table (a pack table, a row-length table) memory-mapped from the cache; :meth:`release`
    drops its resident pages."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        """Raises CorpusError for a file that is not a whole 1-D ``.npy`` table of ``dtype``."""
        try:
            with open(path, "rb") as file:
                np.lib.format.read_magic(file)
                (length,), _, _ = np.lib.format.read_array_header_1_0(file)
        except (ValueError, SyntaxError) as error:  # numpy's errors for a damaged header
            raise CorpusError(f"{path} is not a NumPy table ({error})") from None
        self._mapped = MappedArray(path, dtype.str, length)
        self.array = self._mapped.array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        return self.array[positions]

    @property
    def mapped_bytes(self) -> int:
        """The mapped file's size in bytes (its ``.npy`` header included)."""
        return self._mapped.size

    def release(self) -> None:
        self._mapped.release()


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "linepack"


def epoch_packs(packer: LinePacker | FixedPacker, key: str) -> np.ndarray | FixedPacks | MappedTable:
    """The start (line or token offset) of every pack of one epoch, in corpus order; indexable by
    an int64 array of positions. ``key``: names the corpus and its tokenizer in the cache."""
    if isinstance(packer, FixedPacker):
        return FixedPacks(packer.n_tokens, packer.block_size)
    if packer.lines.n_lines <= IN_MEMORY_PACKS_MAX_LINES:
        return packer.greedy_starts()
    return _cached(f"packs-{key}-lines-{packer.block_size}-{packer.lines.n_lines}.npy", packer.greedy_pieces, PACK_DTYPE)


def row_lengths(lines: Lines, block_size: int, key: str) -> np.ndarray | MappedTable:
    """The content tokens of the row that starts at each of ``lines`` (``LinePacker.lengths``, uint16 (L,)):
    in memory up to :data:`IN_MEMORY_PACKS_MAX_LINES` lines, else from a cache file. ``key``:
    names the corpus, its tokenizer and which of its lines (train or val) in the cache."""
    if lines.n_lines <= IN_MEMORY_PACKS_MAX_LINES:
        return lengths_in_memory(lines, block_size)
    return _cached(f"lengths-{key}-{block_size}-{lines.n_lines}.npy", lambda: length_pieces(lines, block_size), LENGTH_DTYPE)


def _cached(name: str, pieces: Callable[[], Iterable[np.ndarray]], dtype: np.dtype) -> MappedTable:
    """The table ``name`` in the cache folder, written from ``pieces()`` if it is not there yet,
    or again if what is there is damaged (a file cut short: the header's length and the size disagree)."""
    path = cache_dir() / f"{TABLES_VERSION}-{name}"
    if path.exists():
        try:
            return MappedTable(path, dtype)
        except CorpusError as error:
            print(f"{error}: building it again", file=sys.stderr)
    _write(path, pieces(), dtype)
    return MappedTable(path, dtype)


def _write(path: Path, pieces: Iterable[np.ndarray], dtype: np.dtype) -> None:
    """Writes the table to ``path`` piece by piece: into a temporary file, made durable, then
    renamed over ``path`` (producers racing to build it each rename a whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw_fd, raw_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".raw")
    final_fd, final_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    count = 0
    try:
        with os.fdopen(raw_fd, "wb") as raw:
            for piece in pieces:
                raw.write(piece.astype(dtype).tobytes())
                count += len(piece)
        with os.fdopen(final_fd, "wb") as final, open(raw_name, "rb") as raw:
            np.lib.format.write_array_header_1_0(final, {"descr": dtype.str, "fortran_order": False, "shape": (count,)})
            while block := raw.read(1 << 24):
                final.write(block)
            final.flush()
            os.fsync(final.fileno())
        drop_from_page_cache(Path(final_name))  # read back a page at a time, not as the large folios just written
        os.replace(final_name, path)
    finally:
        for leftover in (raw_name, final_name):
            if os.path.exists(leftover):
                os.unlink(leftover)
