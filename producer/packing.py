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

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from producer.lines import Lines

GREEDY_CHUNK_LINES = 1 << 20
LOOK_AHEAD_LINES = 64  # line starts read past a row's start before falling back to a binary search


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


class LinePacker:
    """Line-aligned rows over ``lines`` (docs/SPEC.md §2.3)."""

    def __init__(self, lines: Lines, block_size: int, sep_id: int, pad_id: int) -> None:
        self.lines = lines
        self.block_size = block_size
        self.sep_id = sep_id
        self.pad_id = pad_id
        # Whatever a row reads past the content (the cyclic wrap) is overwritten by [SEP]/[PAD].
        self._reader = RowReader(lines.tokens, block_size)

    def random_starts(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``rows`` line indices drawn uniformly over the line starts."""
        return rng.integers(0, self.lines.n_lines, rows, dtype=np.int64)

    def content_end(self, start_lines: np.ndarray, look_ahead: int = LOOK_AHEAD_LINES) -> np.ndarray:
        """Token offset (exclusive) of each row's content: the end of its last complete line
        within ``block_size - 1`` tokens, or ``start + block_size - 1`` for an overlong first line.

        The line starts are read ``look_ahead`` lines past each start (a few pages of a
        memory-mapped corpus, next to the row's own); only a row that may hold more lines than
        that binary-searches the whole offsets array, whose probes touch pages all over it.
        ``look_ahead=0`` always searches (for many consecutive starts at once)."""
        starts = self.lines.starts
        first = starts[start_lines]
        limit = first + (self.block_size - 1)
        last = start_lines.copy()
        if look_ahead:
            ahead = start_lines[:, None] + np.arange(1, look_ahead + 1)
            inside = ahead < len(starts)
            window = starts[np.minimum(ahead, len(starts) - 1)]
            fitting = ((window <= limit[:, None]) & inside).sum(axis=1)
            last += fitting
            search = (fitting == look_ahead) & inside[:, -1]
        else:
            search = np.ones(len(start_lines), bool)
        last[search] = np.searchsorted(starts, limit[search], side="right") - 1
        return np.where(last > start_lines, starts[last], limit)

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
            following = np.searchsorted(self.lines.starts, self.content_end(chunk, look_ahead=0), side="left").tolist()
            end = int(chunk[-1]) + 1
            packs = []
            while line < end:
                packs.append(line)
                line = following[line - int(chunk[0])]
            yield np.array(packs, dtype=np.int64)

    def pack(self, start_lines: np.ndarray) -> Packed:
        self.lines.check()
        first = self.lines.starts[start_lines]
        content_len = self.content_end(start_lines) - first
        x = self._reader.rows(first)
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
        self._reader = RowReader(lines.tokens, block_size)

    def random_starts(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``rows`` offsets uniform over the windows that fit (offset 0 when the text is shorter than a row)."""
        return rng.integers(0, max(self.n_tokens - self.block_size, 0) + 1, rows, dtype=np.int64)

    def greedy_starts(self, max_rows: int | None = None) -> np.ndarray:
        """Offsets 0, T, 2T, ... covering every token once (the last window wraps to the start)."""
        starts = np.arange(0, self.n_tokens, self.block_size, dtype=np.int64)
        return starts if max_rows is None else starts[:max_rows]

    def pack(self, starts: np.ndarray) -> Packed:
        self._check()
        x = self._reader.rows(starts)
        rows = len(starts)
        return Packed(x, np.ones((rows, self.block_size), np.uint8), np.full(rows, self.block_size, np.int64))
