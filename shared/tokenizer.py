"""Tokenizers (docs/SPEC.md §2.1): characters, UTF-8 bytes, or a Hugging Face ``tokenizers`` file.

Every tokenizer encodes **lines**: a line is its text up to and including ``\\n`` (only
``\\n`` ends a line), and each line is tokenized on its own, so a token row built from whole
lines starts at a line start and holds complete lines, whatever the tokenizer.
:meth:`Tokenizer.encode_text` takes text made of whole lines and returns the ids and each
line's token count, so line boundaries are explicit, never found by searching for a newline id. The base ids
are ``0..V0-1``; Linepack's specials follow (``shared.vocab.SpecialIds``).

- ``char``: the sorted distinct characters of the corpus (V0 = their number).
- ``bytes``: the UTF-8 bytes, V0 = 256; any text, no vocabulary pass.
- ``hf``: a ``tokenizers`` JSON file (BPE, WordPiece, Unigram...), V0 = its vocabulary size.
  Its own special tokens are never produced from corpus text (``encode_special_tokens``, no
  post-processor templates); ``tokenizers`` is imported only when one is used.

A stream's meta carries ``tokenizer`` (the kind) and ``vocab`` (:attr:`Tokenizer.definition`:
the characters, nothing for bytes, the JSON for hf), from which :func:`tokenizer_from_definition`
rebuilds the same tokenizer on any host, and the :attr:`Tokenizer.digest` that names it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.vocab import SPECIAL_TOKENS, SpecialIds, VocabularyError

TOKENIZER_KINDS = ("char", "bytes", "hf")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    """The interface of every tokenizer; subclasses set ``kind``, ``definition`` and ``base_size``.

    Attributes:
        kind: one of :data:`TOKENIZER_KINDS`.
        definition: what rebuilds it (see the module docstring).
        base_size: V0, the number of base ids.
        digest: SHA-256 (64 hex digits) of the definition.
    """

    kind: str
    definition: str

    def __init__(self, base_size: int) -> None:
        self.specials = SpecialIds(base_size)

    @property
    def base_size(self) -> int:
        return self.specials.base_size

    @property
    def mask_id(self) -> int:
        return self.specials.mask_id

    @property
    def sep_id(self) -> int:
        return self.specials.sep_id

    @property
    def pad_id(self) -> int:
        return self.specials.pad_id

    @property
    def vocab_size(self) -> int:
        return self.specials.vocab_size

    @property
    def digest(self) -> str:
        return sha256_hex(self.definition.encode("utf-8"))

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids uint32 (N,), lengths int64 (L,))`` of ``text``, whole lines each ending in ``\\n``:
        the ids of every line, concatenated in order, and the number of ids of each line.
        Raises VocabularyError for text it cannot encode."""
        raise NotImplementedError

    def encode_lines(self, lines: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode_text` of lines that each end in ``\\n``."""
        return self.encode_text("".join(lines))

    def decode_base(self, ids: np.ndarray) -> str:
        """Text of base ids only (all below ``base_size``)."""
        raise NotImplementedError

    def decode(self, ids: Any) -> str:
        """Text of a 1-D sequence of ids; the specials are written ``[MASK]``, ``[SEP]``, ``[PAD]``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise VocabularyError(f"ids must lie in 0..{self.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}")
        special = ids >= self.base_size
        if not special.any():
            return self.decode_base(ids)
        # Runs of base ids are decoded together (a byte or BPE token may need its neighbours).
        edges = np.flatnonzero(np.diff(special.astype(np.int8))) + 1
        pieces = []
        for run in np.split(ids, edges):
            if run[0] >= self.base_size:
                pieces.extend(SPECIAL_TOKENS[int(i) - self.base_size] for i in run)
            else:
                pieces.append(self.decode_base(run))
        return "".join(pieces)


def _lengths_between_newlines(units: np.ndarray, newline: int) -> np.ndarray:
    """int64 (L,): the length of each line of ``units`` (code points or bytes) that end in ``newline``."""
    ends = np.flatnonzero(units == newline) + 1
    if ends.size == 0 or ends[-1] != len(units):
        raise VocabularyError("text to encode must be whole lines, each ending in a line break")
    return np.diff(ends, prepend=0).astype(np.int64)


class CharTokenizer(Tokenizer):
    """Base ids are the sorted distinct characters (code points) of ``chars``."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        super().__init__(len(chars))
        codepoints = np.frombuffer(chars.encode("utf-32-le"), dtype="<u4")
        if np.any(np.diff(codepoints.astype(np.int64)) <= 0):
            raise VocabularyError("vocabulary characters must be sorted and distinct")
        self.chars = chars
        self.definition = chars
        self._codepoints = codepoints

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The sorted set of characters in ``text``."""
        return cls(np.unique(np.frombuffer(text.encode("utf-32-le"), dtype="<u4")).astype("<u4").tobytes().decode("utf-32-le"))

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text``, uint32 ``(len(text),)``; one per character. Vectorized."""
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codepoints, codepoints)
        known = ids < self.base_size
        known[known] = self._codepoints[ids[known]] == codepoints[known]
        if not known.all():
            offset = int(np.argmin(known))
            raise VocabularyError(f"character {text[offset]!r} at offset {offset} is not in the vocabulary")
        return ids.astype(np.uint32)

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        return self.encode(text), _lengths_between_newlines(codepoints, ord("\n"))

    def decode_base(self, ids: np.ndarray) -> str:
        return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le")


class ByteTokenizer(Tokenizer):
    """Base ids are the 256 byte values of the UTF-8 encoding."""

    kind = "bytes"
    definition = ""

    def __init__(self) -> None:
        super().__init__(256)

    @property
    def digest(self) -> str:
        return sha256_hex(b"linepack utf-8 bytes")

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_utf8(text.encode("utf-8"))

    def encode_utf8(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode_text` of text already UTF-8 encoded (no decode, no copy but the widening)."""
        units = np.frombuffer(data, dtype=np.uint8)
        return units.astype(np.uint32), _lengths_between_newlines(units, ord("\n"))

    def decode_base(self, ids: np.ndarray) -> str:
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` from its JSON (``tokenizer.json``)."""

    kind = "hf"

    def __init__(self, definition: str) -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise VocabularyError("a Hugging Face tokenizer needs the tokenizers package (pip install tokenizers)") from None
        try:
            backend = Backend.from_str(definition)
        except Exception as error:  # tokenizers raises its own Exception types for bad JSON
            raise VocabularyError(f"not a tokenizers file: {str(error)[:200]}") from None
        backend.encode_special_tokens = True  # "[CLS]" in the corpus is text, not a special token
        backend.no_truncation()
        backend.no_padding()
        super().__init__(backend.get_vocab_size(with_added_tokens=True))
        self.definition = definition
        self.backend = backend

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise VocabularyError(f"cannot read the tokenizer file {path}: {error}") from None
        try:
            return cls(text)
        except VocabularyError as error:
            raise VocabularyError(f"{path}: {error}") from None

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        pieces = text.split("\n")
        if pieces[-1] != "":
            raise VocabularyError("text to encode must be whole lines, each ending in a line break")
        return self.encode_lines([piece + "\n" for piece in pieces[:-1]])

    def encode_lines(self, lines: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.backend.encode_batch_fast(list(lines), add_special_tokens=False)
        per_line = [encoding.ids for encoding in encodings]
        lengths = np.fromiter(map(len, per_line), dtype=np.int64, count=len(per_line))
        ids = np.fromiter((i for line in per_line for i in line), dtype=np.uint32, count=int(lengths.sum()))
        return ids, lengths

    def decode_base(self, ids: np.ndarray) -> str:
        return self.backend.decode(ids.tolist(), skip_special_tokens=False)


def tokenizer_from_definition(kind: str, definition: str) -> Tokenizer:
    """The tokenizer a stream's meta describes (``meta.tokenizer``, ``meta.vocab``)."""
    if kind == "char":
        return CharTokenizer(definition)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(definition)
    raise VocabularyError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")


def load_tokenizer(spec: str, text: str | None = None) -> Tokenizer:
    """``char`` (its vocabulary from ``text``), ``bytes``, or the path of a ``tokenizers`` JSON file."""
    if spec == "char":
        if text is None:
            raise ValueError("the char tokenizer needs the corpus text for its vocabulary")
        return CharTokenizer.from_text(text)
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec)
