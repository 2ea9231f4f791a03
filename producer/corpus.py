"""The corpus: loading it, and splitting its token ids into train and val lines (docs/SPEC.md §2.2).

A line is its characters plus its terminating ``\\n``; a corpus whose last line has no
``\\n`` gets one, so every line has one. Lines, not characters, are split: the first
``1 - val_fraction`` of them are train, the rest val.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUILTIN_NAME = "builtin:pydoc_data.topics"


class CorpusError(ValueError):
    """The corpus cannot be used: missing, empty (line breaks only), or not UTF-8."""


@dataclass(frozen=True)
class Corpus:
    """The corpus text (ends with ``\\n``), where it came from, and its fingerprint
    (first 16 hex digits of the SHA-256 of the UTF-8 text)."""

    text: str
    name: str
    fingerprint: str


@dataclass(frozen=True)
class Lines:
    """A run of complete lines as one token array.

    Attributes:
        tokens: token ids, uint16 (N,); every line ends with the newline id.
        starts: int64 (L + 1,), the offset of each line start, then N: line i is
            ``tokens[starts[i]:starts[i + 1]]``.
    """

    tokens: np.ndarray
    starts: np.ndarray

    @property
    def n_lines(self) -> int:
        return len(self.starts) - 1


def load_corpus(path: str | None) -> Corpus:
    """The corpus at ``path`` (a UTF-8 file, or a folder whose ``.txt`` files are read in sorted
    order), or CPython's built-in help text when ``path`` is None. Raises :class:`CorpusError`."""
    if path is None:
        from pydoc_data.topics import topics

        pieces, name = [topics[key] for key in sorted(topics)], BUILTIN_NAME
    else:
        source = Path(path)
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.suffix == ".txt" and p.is_file())
            if not files:
                raise CorpusError(f"corpus folder {path} holds no .txt files")
        elif source.is_file():
            files = [source]
        else:
            raise CorpusError(f"corpus {path} does not exist")
        pieces, name = [_read_utf8(file) for file in files], str(source)
    text = "".join(piece if piece.endswith("\n") else piece + "\n" for piece in pieces if piece)
    if not text.strip("\n"):
        raise CorpusError(f"corpus {name} is empty (it has no characters besides line breaks)")
    return Corpus(text, name, hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"{file} is not UTF-8: undecodable byte 0x{data[error.start]:02x} at byte offset {error.start}") from None


def split_lines(tokens: np.ndarray, newline_id: int, val_fraction: float) -> tuple[Lines, Lines | None]:
    """The train lines and the val lines (None when ``val_fraction`` is 0) of a token array
    that ends with ``newline_id``. A nonzero fraction keeps at least one line on each side."""
    starts = np.concatenate([[0], np.flatnonzero(tokens == newline_id) + 1]).astype(np.int64)
    n_lines = len(starts) - 1
    if val_fraction == 0:
        return Lines(tokens, starts), None
    if n_lines < 2:
        raise CorpusError(f"the corpus has {n_lines} line; a val split needs at least 2 (or --val-fraction 0)")
    n_val = min(max(round(n_lines * val_fraction), 1), n_lines - 1)
    cut = n_lines - n_val
    train = Lines(tokens[: starts[cut]], starts[: cut + 1])
    val = Lines(tokens[starts[cut] :], starts[cut:] - starts[cut])
    return train, val
