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
        self.reader = RowReader(lines.tokens, block_size)
        # The look-ahead pays only where a row mostly holds fewer lines than it reads: with
        # shorter lines nearly every row searches anyway, and reading the look-ahead first only
        # costs (a fifth of a 64-row pack at block 1024 with 10 tokens a line).
        tokens_per_line = len(lines.tokens) / max(lines.n_lines, 1)
        self.look_ahead = LOOK_AHEAD_LINES if tokens_per_line * LOOK_AHEAD_LINES >= block_size else 0

    def random_starts(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``rows`` line indices drawn uniformly over the line starts."""
        return rng.integers(0, self.lines.n_lines, rows, dtype=np.int64)

    def content_end(self, start_lines: np.ndarray, look_ahead: int | None = None) -> np.ndarray:
        """Token offset (exclusive) of each row's content: the end of its last complete line
        within ``block_size - 1`` tokens, or ``start + block_size - 1`` for an overlong first line.

        The line starts are read ``look_ahead`` lines past each start (a few pages of a
        memory-mapped corpus, next to the row's own); only a row that may hold more lines than
        that binary-searches the whole offsets array, whose probes touch pages all over it.
        ``look_ahead=0`` always searches (for many consecutive starts at once); None: the
        packer's choice (:data:`LOOK_AHEAD_LINES`, or 0 for lines short enough that a row
        mostly holds more)."""
        look_ahead = self.look_ahead if look_ahead is None else look_ahead
        starts = self.lines.starts
        limit = starts[start_lines] + (self.block_size - 1)
        if look_ahead:
            ahead = start_lines[:, None] + np.arange(1, look_ahead + 1)
            inside = ahead < len(starts)
            window = starts[np.minimum(ahead, len(starts) - 1)]
            fitting = ((window <= limit[:, None]) & inside).sum(axis=1)
            last = start_lines + fitting
            search = (fitting == look_ahead) & inside[:, -1]
            last[search] = np.searchsorted(starts, limit[search], side="right") - 1
        else:
            last = np.searchsorted(starts, limit, side="right") - 1
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

    def locate(self, start_lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(first, content_len)``, int64 (R,) each: the token offset of each row's first token
        and its tokens before ``[SEP]``."""
        self.lines.check()
        first = self.lines.starts[start_lines]
        return first, self.content_end(start_lines) - first

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
