"""Stream meta: what a trainer must know about a stream, and what pins it (docs/SPEC.md §3).

A :class:`StreamMeta` is immutable and has a stable hash (:attr:`StreamMeta.digest`), the
same in every process and on every machine. It travels in every message header as a
plain dict (:meth:`StreamMeta.to_dict`); the consumer pins the first one it accepts and
rejects any message whose meta differs, naming the field (:meth:`StreamMeta.differences`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from shared.limits import MAX_BLOCK_SIZE, MAX_ROWS_PER_MESSAGE, PACKINGS, SAMPLINGS
from shared.vocab import IGNORE_INDEX, Vocabulary, VocabularyError


class MetaError(ValueError):
    """A meta dict is malformed or inconsistent."""


@dataclass(frozen=True)
class StreamMeta:
    """Everything about a stream that a consumer must agree with.

    Attributes:
        block_size: tokens per row (T).
        rows_per_message: rows per wire message (R); messages are reassembled into batches.
        vocab: the base characters in id order (id i is ``vocab[i]``).
        vocab_size, mask_id, sep_id, pad_id, ignore_index: the special ids of docs/SPEC.md §2.1,
            redundant with ``vocab`` and checked against it.
        packing: ``lines`` or ``fixed`` (docs/SPEC.md §2.3, §2.4).
        sampling: ``random`` or ``epoch``.
        corruption: canonical JSON of the corruption policy (policy name, its parameters,
            mask fractions, supervise_sep, stages); see :attr:`corruption_config`.
        seed: the base seed shared by every producer of the stream (the val set depends on it).
        corpus_fingerprint: first 16 hex digits of the SHA-256 of the corpus text.
        val_messages: number of messages in the fixed validation set.
        token_counts: occurrences of each base id over the content tokens of the train
            split (length V0), for the context-free floor.
    """

    block_size: int
    rows_per_message: int
    vocab: str
    vocab_size: int
    mask_id: int
    sep_id: int
    pad_id: int
    ignore_index: int
    packing: str
    sampling: str
    corruption: str
    seed: int
    corpus_fingerprint: str
    val_messages: int
    token_counts: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            vocabulary = Vocabulary(self.vocab)
        except VocabularyError as error:
            raise MetaError(f"meta field vocab: {error}") from None
        expected = {
            "vocab_size": vocabulary.vocab_size,
            "mask_id": vocabulary.mask_id,
            "sep_id": vocabulary.sep_id,
            "pad_id": vocabulary.pad_id,
            "ignore_index": IGNORE_INDEX,
        }
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise MetaError(f"meta field {name}={getattr(self, name)!r} does not match the vocabulary ({value})")
        if not 2 <= self.block_size <= MAX_BLOCK_SIZE:
            raise MetaError(f"block_size {self.block_size} is outside 2..{MAX_BLOCK_SIZE}")
        if not 1 <= self.rows_per_message <= MAX_ROWS_PER_MESSAGE:
            raise MetaError(f"rows_per_message {self.rows_per_message} is outside 1..{MAX_ROWS_PER_MESSAGE}")
        if self.packing not in PACKINGS:
            raise MetaError(f"packing {self.packing!r} is not one of {PACKINGS}")
        if self.sampling not in SAMPLINGS:
            raise MetaError(f"sampling {self.sampling!r} is not one of {SAMPLINGS}")
        if len(self.token_counts) != vocabulary.base_size:
            raise MetaError(f"token_counts has {len(self.token_counts)} entries, expected {vocabulary.base_size}")
        if self.val_messages < 0:
            raise MetaError(f"val_messages {self.val_messages} is negative")
        try:
            json.loads(self.corruption)
        except (ValueError, RecursionError) as error:  # deep nesting raises RecursionError
            raise MetaError(f"corruption is not JSON: {error}") from None

    @classmethod
    def build(cls, vocabulary: Vocabulary, corruption: dict[str, Any], token_counts, **rest: Any) -> StreamMeta:
        """A meta whose special ids come from ``vocabulary`` and whose corruption is canonical JSON."""
        return cls(
            vocab=vocabulary.chars,
            vocab_size=vocabulary.vocab_size,
            mask_id=vocabulary.mask_id,
            sep_id=vocabulary.sep_id,
            pad_id=vocabulary.pad_id,
            ignore_index=IGNORE_INDEX,
            corruption=canonical_json(corruption),
            token_counts=tuple(int(c) for c in token_counts),
            **rest,
        )

    @classmethod
    def from_dict(cls, data: Any) -> StreamMeta:
        """Parse the wire form; raises :class:`MetaError` on any missing, extra or mistyped field."""
        if not isinstance(data, dict):
            raise MetaError("meta is not a map")
        names = [f.name for f in fields(cls)]
        missing = sorted(set(names) - set(data))
        extra = sorted(set(data) - set(names))
        if missing or extra:
            raise MetaError(f"meta fields missing {missing} / unknown {extra}")
        for f in fields(cls):
            value = data[f.name]
            if f.name == "token_counts":
                if not isinstance(value, (list, tuple)) or not all(type(c) is int and c >= 0 for c in value):
                    raise MetaError("meta field token_counts must be a list of non-negative integers")
            elif type(value) is not {"int": int, "str": str}[f.type]:
                raise MetaError(f"meta field {f.name} must be {f.type}, got {type(value).__name__}")
        return cls(**{**data, "token_counts": tuple(data["token_counts"])})

    def to_dict(self) -> dict[str, Any]:
        """The wire form: a new dict of plain values (``token_counts`` as a list)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["token_counts"] = list(self.token_counts)
        return data

    @cached_property
    def digest(self) -> str:
        """Stable hash: first 16 hex digits of SHA-256 over the canonical JSON of the meta."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()[:16]

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.vocab)

    @property
    def corruption_config(self) -> dict[str, Any]:
        return json.loads(self.corruption)

    def summary(self) -> MetaSummary:
        """The meta without the per-id counts and the vocabulary itself (for diagnostics)."""
        data = {name: value for name, value in self.to_dict().items() if name not in SUMMARY_OMITS}
        data["corruption"] = self.corruption_config
        return MetaSummary(**data, base_size=len(self.token_counts), content_tokens=sum(self.token_counts), digest=self.digest)

    def differences(self, other: StreamMeta) -> list[tuple[str, Any, Any]]:
        """``(field, self value, other value)`` for every field that differs, in field order."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


SUMMARY_OMITS = ("vocab", "token_counts")  # large, and in the meta only for decoding and the floor
# StreamMeta without SUMMARY_OMITS, the corruption parsed, and three derived numbers: V0
# (base_size), the sum of the counts (content_tokens) and the digest. Derived from StreamMeta's
# fields so that a new meta field reaches the diagnostics without a second declaration.
MetaSummary = dataclasses.make_dataclass(
    "MetaSummary",
    [(f.name, dict[str, Any] if f.name == "corruption" else f.type) for f in fields(StreamMeta) if f.name not in SUMMARY_OMITS]
    + [("base_size", int), ("content_tokens", int), ("digest", str)],
    frozen=True,
)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
