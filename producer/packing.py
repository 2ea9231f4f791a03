"""Packing token ids into rows of ``block_size`` (docs/SPEC.md §2.3, §2.4). Vectorized: no loop over
rows, lines or tokens on the hot path.

A packer turns an int64 array of *starts* into a :class:`Packed` batch:

- :class:`LinePacker` (``--packing lines``): a start is a line index. A row holds the complete
  lines from its start line on while they fit in ``block_size - 1`` tokens (an overlong first
  line is cut to ``block_size - 1``), then ``[SEP]``, then ``[PAD]`` to the end.
- :class:`FixedPacker` (``--packing fixed``): a start is a token offset; a row is the next
  ``block_size`` tokens (cyclically past the end), attention all ones, no ``[SEP]``/``[PAD]``.

Both offer ``random_starts`` (uniform) and ``greedy_starts`` (consecutive, non-overlapping
rows in corpus order: the epoch packs and the val set).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from producer.lines import Lines

if TYPE_CHECKING:
    from producer.packs import MappedTable

GREEDY_CHUNK_LINES = 1 << 20
LENGTH_DTYPE = np.dtype("<u2")  # a row's content tokens: at most MAX_BLOCK_SIZE - 1


@dataclass
class Packed:
    """A batch of packed rows.

    Attributes:
        x: token ids, uint16 (R, T); lines packing: content, ``[SEP]`` at ``content_len``, ``[PAD]`` after.
        attention_mask: uint8 (R, T), 1 for the visible positions ``t < valid_len`` ([SEP] included).
        content_len: int64 (R,), tokens before ``[SEP]`` (``T`` for fixed packing).
    """

    x: np.ndarray
    attention_mask: np.ndarray
    content_len: np.ndarray


@lru_cache(maxsize=8)
def _prefix_rows(block_size: int) -> np.ndarray:
    """Read-only bool (block_size + 1, block_size) view: row ``block_size - n`` is n ones, then zeros."""
    ones_then_zeros = np.concatenate([np.ones(block_size, bool), np.zeros(block_size, bool)])
    return sliding_window_view(ones_then_zeros, block_size)


def prefix_mask(lengths: np.ndarray, block_size: int) -> np.ndarray:
    """bool (R, T), True at ``t < lengths[i]``. A gather of whole rows, far faster than comparing
    against ``arange(T)``."""
    return _prefix_rows(block_size)[block_size - lengths]


class RowReader:
    """Rows of ``block_size`` consecutive tokens from any offsets, cyclically past the end.

    Reading copies only the rows (contiguous runs, through a sliding-window view), never the
    token array itself, which may be memory-mapped and larger than memory.
    """

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self._windows = sliding_window_view(tokens, block_size) if len(tokens) >= block_size else None

    def rows(self, first: np.ndarray) -> np.ndarray:
        """A new array (R, T): row i is the ``block_size`` tokens from ``first[i]`` on."""
        n = len(self.tokens)
        inside = first <= n - self.block_size
        if self._windows is not None and inside.all():
            return self._windows[first]
        out = np.empty((len(first), self.block_size), dtype=self.tokens.dtype)
        if self._windows is not None:
            out[inside] = self._windows[first[inside]]
        wrapped = ~inside if self._windows is not None else np.ones(len(first), bool)
        out[wrapped] = self.tokens[(first[wrapped, None] + np.arange(self.block_size)) % n]
        return out


def content_ends(starts: np.ndarray, block_size: int, start_lines: np.ndarray) -> np.ndarray:
    """Token offset (exclusive), int64 (R,), of the content of the row that starts at each of
    ``start_lines`` (int64 (R,)): the end of its last complete line within ``block_size - 1``
    tokens, or ``start + block_size - 1`` for an overlong first line. ``starts``: int64 (L + 1,)
    line starts, then the end."""
    limit = starts[start_lines] + (block_size - 1)
    last = np.searchsorted(starts, limit, side="right") - 1
    return np.where(last > start_lines, starts[last], limit)


def length_pieces(lines: Lines, block_size: int) -> Iterator[np.ndarray]:
    """The content tokens (before ``[SEP]``) of the row that starts at each line, uint16 (at most
    ``MAX_BLOCK_SIZE - 1``), in pieces of :data:`GREEDY_CHUNK_LINES` lines (uint16 (<= that,)
    each; sorted searches: one pass)."""
    for line in range(0, lines.n_lines, GREEDY_CHUNK_LINES):
        chunk = np.arange(line, min(lines.n_lines, line + GREEDY_CHUNK_LINES), dtype=np.int64)
        yield (content_ends(lines.starts, block_size, chunk) - lines.starts[chunk]).astype(LENGTH_DTYPE)


def lengths_in_memory(lines: Lines, block_size: int) -> np.ndarray:
    """:func:`length_pieces` as one array, uint16 (L,)."""
    return np.concatenate([np.zeros(0, LENGTH_DTYPE), *length_pieces(lines, block_size)])


class LinePacker:
    """Line-aligned rows over ``lines`` (docs/SPEC.md §2.3).

    ``lengths`` (uint16 (L,): an array, or a ``producer.packs.MappedTable``; either is indexed
    by an int64 array): the content tokens of the row that starts at each line
    (:func:`length_pieces`), computed once, so that locating a row is two reads instead of a
    binary search over every line start (whose probes wait on memory: a quarter of a message's
    packing on a 25 MB corpus). None: computed here, in memory (``producer.packs.row_lengths``
    gives a large corpus's from a cache file instead).
    """

    def __init__(self, lines: Lines, block_size: int, sep_id: int, pad_id: int,
                 lengths: np.ndarray | MappedTable | None = None) -> None:
        self.lines = lines
        self.block_size = block_size
        self.sep_id = sep_id
        self.pad_id = pad_id
        # Whatever a row reads past the content (the cyclic wrap) is overwritten by [SEP]/[PAD].
        self.reader = RowReader(lines.tokens, block_size)
        self.lengths = lengths if lengths is not None else lengths_in_memory(lines, block_size)

    def random_starts(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``rows`` line indices drawn uniformly over the line starts."""
        return rng.integers(0, self.lines.n_lines, rows, dtype=np.int64)

    def greedy_starts(self, max_rows: int | None = None) -> np.ndarray:
        """Start lines of the greedy packs in corpus order: each pack starts at the line after
        the previous pack's last (possibly truncated) line, so every line is in exactly one pack.
        Stops after ``max_rows`` packs (the val set)."""
        packs: list[np.ndarray] = []
        found = 0
        for piece in self.greedy_pieces():
            packs.append(piece)
            found += len(piece)
            if max_rows is not None and found >= max_rows:
                break
        starts = np.concatenate(packs) if packs else np.zeros(0, np.int64)
        return starts if max_rows is None else starts[:max_rows]

    def greedy_pieces(self) -> Iterator[np.ndarray]:
        """:meth:`greedy_starts` piece by piece: the packs that start in each run of
        :data:`GREEDY_CHUNK_LINES` lines, so memory stays bounded on a large (memory-mapped) corpus."""
        n_lines = self.lines.n_lines
        line = 0
        while line < n_lines:
            chunk = np.arange(line, min(n_lines, line + GREEDY_CHUNK_LINES), dtype=np.int64)
            # The next pack starts at the first line not wholly inside this one (an overlong line is consumed).
            ends = self.lines.starts[chunk] + self.lengths[chunk]
            following = np.searchsorted(self.lines.starts, ends, side="left").tolist()
            end = int(chunk[-1]) + 1
            packs = []
            while line < end:
                packs.append(line)
                line = following[line - int(chunk[0])]
            yield np.array(packs, dtype=np.int64)

    def locate(self, start_lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(first, content_len)``, int64 (R,) each: the token offset of each row's first token
        and its tokens before ``[SEP]``."""
        self.lines.check()
        return self.lines.starts[start_lines], self.lengths[start_lines].astype(np.int64)

    def pack(self, start_lines: np.ndarray) -> Packed:
        first, content_len = self.locate(start_lines)
        return self.finish(self.reader.rows(first), content_len)

    def finish(self, x: np.ndarray, content_len: np.ndarray) -> Packed:
        """The batch of rows ``x`` (R, T) read from the rows' first tokens: ``[SEP]`` and ``[PAD]``
        written into ``x`` by ``content_len`` (R,)."""
        visible = prefix_mask(content_len + 1, self.block_size)
        np.copyto(x, self.pad_id, where=~visible)
        x[np.arange(len(x)), content_len] = self.sep_id
        return Packed(x, visible.view(np.uint8), content_len)


class FixedPacker:
    """Fixed windows of ``block_size`` consecutive tokens over ``lines.tokens`` (docs/SPEC.md §2.4)."""

    def __init__(self, lines: Lines, block_size: int) -> None:
        self.n_tokens = len(lines.tokens)
        self.block_size = block_size
        self._check = lines.check
        self.reader = RowReader(lines.tokens, block_size)

    def random_starts(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``rows`` offsets uniform over the windows that fit (offset 0 when the text is shorter than a row)."""
        return rng.integers(0, max(self.n_tokens - self.block_size, 0) + 1, rows, dtype=np.int64)

    def greedy_starts(self, max_rows: int | None = None) -> np.ndarray:
        """Offsets 0, T, 2T, ... covering every token once (the last window wraps to the start)."""
        starts = np.arange(0, self.n_tokens, self.block_size, dtype=np.int64)
        return starts if max_rows is None else starts[:max_rows]

    def locate(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(first, content_len)``, int64 (R,) each: the rows' offsets, and ``T`` (no ``[SEP]``)."""
        self._check()
        return starts, np.full(len(starts), self.block_size, np.int64)

    def pack(self, starts: np.ndarray) -> Packed:
        first, content_len = self.locate(starts)
        return self.finish(self.reader.rows(first), content_len)

    def finish(self, x: np.ndarray, content_len: np.ndarray) -> Packed:
        """The batch of rows ``x`` (R, T) as read: attention all ones."""
        return Packed(x, np.ones(x.shape, np.uint8), content_len)


def pack_pieces(pieces: Sequence[tuple[LinePacker | FixedPacker, np.ndarray, np.ndarray]], rows: int) -> Packed:
    """One batch of ``rows`` rows from the packers of several corpora with one tokenizer, block size
    and packing (the sources of a mixture): piece ``(packer, starts, places)`` gives rows ``places``
    (int64) from ``starts``. Row for row what each packer's own ``pack`` gives, but each row is
    copied once into place and ``[SEP]``, ``[PAD]`` and the mask are made once for the batch."""
    packers = [packer for packer, _, _ in pieces]
    x = np.empty((rows, packers[0].block_size), dtype=np.result_type(*(p.reader.tokens.dtype for p in packers)))
    content_len = np.empty(rows, dtype=np.int64)
    for packer, starts, places in pieces:
        first, content_len[places] = packer.locate(starts)
        x[places] = packer.reader.rows(first)
    return packers[0].finish(x, content_len)
