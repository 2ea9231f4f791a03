"""Token lines: the form every corpus takes, in memory or memory-mapped (docs/SPEC.md §2.2, §2.3).

A line is its tokens up to and including the tokens of its ``\\n``; line boundaries are explicit
(``offsets``), whatever the tokenizer. Lines, not tokens, are split into train and val.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.tokenizer import Tokenizer


class CorpusError(ValueError):
    """The corpus cannot be used: missing, empty (line breaks only), not UTF-8, not encodable,
    or a prepared folder that is incomplete or does not match the flags."""


@dataclass(frozen=True)
class Lines:
    """A run of complete lines as one token array.

    Attributes:
        tokens: token ids (N,), uint16 or uint32 (possibly memory-mapped).
        starts: int64 (L + 1,), the offset of each line start, then N: line i is
            ``tokens[starts[i]:starts[i + 1]]``.
        check: raises CorpusError if the files under a memory-mapped ``tokens`` shrank; called
            before each read of rows (:attr:`TokenCorpus.check_files`).
    """

    tokens: np.ndarray
    starts: np.ndarray
    check: Callable[[], None] = lambda: None

    @property
    def n_lines(self) -> int:
        return len(self.starts) - 1


@dataclass
class TokenCorpus:
    """A tokenized corpus: its lines, split point, tokenizer and train unigram counts.

    Attributes:
        name: where it came from; fingerprint: 16 hex digits naming it (the text's SHA-256, or
            the prepared folder's manifest fingerprint).
        tokenizer: the tokenizer its ids belong to.
        tokens: ids (N,), uint16 or uint32; offsets: int64 (L + 1,) line starts, then N.
        split_line: lines ``0..split_line-1`` are train, the rest val.
        train_counts: int64 (V0,) occurrences of each base id in the train lines.
        release_pages: drops this process's resident pages of a memory-mapped corpus (the page
            cache keeps them, shared by every producer); a no-op in memory.
        mapped_bytes: the size in bytes of its memory-mapped files (0 in memory): what its
            resident pages can never exceed, released or not.
        check_files: raises CorpusError if a memory-mapped file shrank (before a read would
            fault); a no-op in memory. The packers call it before each read of rows.
    """

    name: str
    fingerprint: str
    tokenizer: Tokenizer
    tokens: np.ndarray
    offsets: np.ndarray
    split_line: int
    train_counts: np.ndarray
    release_pages: Callable[[], None] = lambda: None
    mapped_bytes: int = 0
    check_files: Callable[[], None] = lambda: None

    @property
    def n_lines(self) -> int:
        return len(self.offsets) - 1

    def train_lines(self) -> Lines:
        end = int(self.offsets[self.split_line])
        return Lines(self.tokens[:end], self.offsets[: self.split_line + 1], self.check_files)

    def val_lines(self) -> Lines | None:
        """The val lines (their offsets rebased to 0), None without a val split."""
        if self.split_line == self.n_lines:
            return None
        start = int(self.offsets[self.split_line])
        return Lines(self.tokens[start:], np.asarray(self.offsets[self.split_line :]) - start, self.check_files)


def split_point(n_lines: int, val_fraction: float) -> int:
    """The first val line: the last ``val_fraction`` of the lines are val; a nonzero fraction
    keeps at least one line on each side."""
    if val_fraction == 0:
        return n_lines
    if n_lines < 2:
        raise CorpusError(f"the corpus has {n_lines} line; a val split needs at least 2 (or --val-fraction 0)")
    n_val = min(max(round(n_lines * val_fraction), 1), n_lines - 1)
    return n_lines - n_val
