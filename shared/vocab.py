"""Character vocabulary and special ids (docs/SPEC.md §2.1).

Base ids ``0..V0-1`` are the sorted distinct characters of the corpus; the specials are
appended: ``[MASK] = V0``, ``[SEP] = V0 + 1``, ``[PAD] = V0 + 2``; ``vocab_size = V0 + 3``.
Labels use ``IGNORE_INDEX`` (-100) for every position that is not supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.limits import MAX_VOCAB_SIZE

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("[MASK]", "[SEP]", "[PAD]")


class VocabularyError(ValueError):
    """The corpus cannot be expressed with this vocabulary."""


@dataclass(frozen=True)
class Vocabulary:
    """The base characters in id order, plus the three appended special ids."""

    chars: str
    _codepoints: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chars:
            raise VocabularyError("the vocabulary is empty: the corpus has no characters")
        codepoints = np.frombuffer(self.chars.encode("utf-32-le"), dtype="<u4")
        if np.any(np.diff(codepoints.astype(np.int64)) <= 0):
            raise VocabularyError("vocabulary characters must be sorted and distinct")
        if len(self.chars) + len(SPECIAL_TOKENS) > MAX_VOCAB_SIZE:
            raise VocabularyError(
                f"{len(self.chars)} distinct characters: the vocabulary must stay below "
                f"{MAX_VOCAB_SIZE - len(SPECIAL_TOKENS)} base characters (int16 labels)"
            )
        object.__setattr__(self, "_codepoints", codepoints)

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        """The sorted set of characters in ``text``."""
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        return cls(np.unique(codepoints).astype("<u4").tobytes().decode("utf-32-le"))

    @property
    def base_size(self) -> int:
        """V0, the number of base (character) ids."""
        return len(self.chars)

    @property
    def mask_id(self) -> int:
        return self.base_size

    @property
    def sep_id(self) -> int:
        return self.base_size + 1

    @property
    def pad_id(self) -> int:
        return self.base_size + 2

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, shape ``(len(text),)``, dtype uint16. Vectorized."""
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codepoints, codepoints)
        known = ids < self.base_size
        known[known] = self._codepoints[ids[known]] == codepoints[known]
        if not known.all():
            offset = int(np.argmin(known))
            raise VocabularyError(f"character {text[offset]!r} at offset {offset} is not in the vocabulary")
        return ids.astype(np.uint16)

    def decode(self, ids) -> str:
        """Text of a 1-D sequence of ids; specials are written as ``[MASK]``, ``[SEP]``, ``[PAD]``."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise VocabularyError(f"ids must lie in 0..{self.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}")
        names = list(self.chars) + list(SPECIAL_TOKENS)
        return "".join(names[int(i)] for i in ids)
