"""The id layout every stream shares, whatever its tokenizer (docs/SPEC.md §2.1, §3).

A tokenizer (``shared.tokenizer``) gives the base ids ``0..V0-1``; Linepack's specials come
after them: ``[MASK] = V0``, ``[SEP] = V0 + 1``, ``[PAD] = V0 + 2``; ``vocab_size = V0 + 3``.
Labels use ``IGNORE_INDEX`` (-100) for every position that is not supervised. Ids travel as
the smallest dtype that holds them (:func:`id_dtype`, :func:`label_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.limits import MAX_VOCAB_SIZE

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("[MASK]", "[SEP]", "[PAD]")


class VocabularyError(ValueError):
    """The corpus cannot be expressed with this vocabulary (or the vocabulary does not fit the wire)."""


@dataclass(frozen=True)
class SpecialIds:
    """The ids appended after ``base_size`` (V0) base ids."""

    base_size: int

    def __post_init__(self) -> None:
        if self.base_size < 1:
            raise VocabularyError("the vocabulary is empty: the corpus has no tokens")
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise VocabularyError(f"{self.base_size} base ids + {len(SPECIAL_TOKENS)} specials do not fit the wire: "
                                  f"at most {MAX_VOCAB_SIZE} ids (int32 labels)")

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


def id_dtype(vocab_size: int) -> np.dtype:
    """Token ids on the wire and in a prepared corpus: uint16 while every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def label_dtype(vocab_size: int) -> np.dtype:
    """Labels on the wire (ids and ``IGNORE_INDEX``): int16 while every id fits, else int32."""
    return np.dtype("<i2") if vocab_size <= 1 << 15 else np.dtype("<i4")
