"""Stream meta: what a trainer must know about a stream, and what pins it (docs/SPEC.md §3).

A :class:`StreamMeta` is immutable, validated in full when it is made (so whatever a consumer
pins is usable), and has a stable hash (:attr:`StreamMeta.digest`), the same in every process
and on every machine. It travels as a plain dict (:meth:`StreamMeta.to_dict`) in the stream's
meta messages; batch messages carry only its digest. The consumer pins the first one it
accepts and rejects any message whose meta differs, naming the field
(:meth:`StreamMeta.differences`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import sys
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np

from shared.canonical import canonical_json
from shared.corruption import Corruption, CorruptionError
from shared.digest import short_hex, short_sha256
from shared.limits import COUNT_DTYPE, MAX_BLOCK_SIZE, MAX_ROWS_PER_MESSAGE, PACKINGS, SAMPLINGS
from shared.mixture import Mixture, MixtureError, SourceInfo, SourceSummary, check_sources, source_differences
from shared.tokenizer import TOKENIZER_KINDS, CharTokenizer, HFTokenizer, Tokenizer, sha256_hex, tokenizer_from_definition
from shared.vocab import IGNORE_INDEX, SpecialIds, VocabularyError

FINGERPRINT = re.compile(r"[0-9a-f]{16}")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SEED = (1 << 63) - 1  # a msgpack int64: every common reader takes it
MAX_COUNT = (1 << 64) - 1
DIGEST_CHUNK = 1 << 16  # counts written at a time while hashing


class MetaError(ValueError):
    """A meta dict is malformed or inconsistent."""


@dataclass(frozen=True)
class StreamMeta:
    """Everything about a stream that a consumer must agree with.

    Attributes:
        block_size: tokens per row (T).
        rows_per_message: rows per wire message (R); messages are reassembled into batches.
        tokenizer: ``char``, ``bytes`` or ``hf`` (``shared.tokenizer``).
        vocab: what rebuilds the tokenizer: the base characters in id order (char), empty
            (bytes), or the ``tokenizers`` JSON (hf).
        tokenizer_digest: SHA-256 (64 hex digits) of the tokenizer definition.
        vocab_size, mask_id, sep_id, pad_id, ignore_index: the special ids of docs/SPEC.md §2.1
            (V0 = ``mask_id``), checked against each other and the tokenizer.
        packing: ``lines`` or ``fixed`` (docs/SPEC.md §2.3, §2.4).
        sampling: ``random`` or ``epoch``.
        corruption: the corruption (``shared.corruption``); the wire form holds its canonical
            JSON (:attr:`~shared.corruption.Corruption.json_text`), parsed once when a meta is read.
        seed: the base seed shared by every producer of the stream (the val set depends on it).
        corpus_fingerprint: 16 hex digits naming the corpus (text or prepared folder).
        val_messages: number of messages in the fixed validation set.
        token_counts: occurrences of each base id over the content tokens of the train
            split, for the context-free floor: V0 little-endian uint64 (8 bytes per id), compact
            whatever the vocabulary (:attr:`counts` reads it as an array).
        epoch_rows: rows in one epoch of the train schedule with epoch sampling (the greedy packs
            of the train lines), 0 with random sampling; the wire form omits it when 0, so a
            random-sampling meta is the same map as in protocol 2. 0 for a mixture (each source
            has its own).
        sources: the sources of a mixture (:class:`~shared.mixture.SourceInfo`, docs/SPEC.md
            §2.9), empty for a single corpus; the wire form and the digest omit it when empty, so a
            single-corpus meta is the same map as before mixtures. For a mixture
            ``corpus_fingerprint`` is :func:`mixture_fingerprint` of the sources and
            ``token_counts`` their counts mixed by weight (:func:`mixed_counts`).
    """

    block_size: int
    rows_per_message: int
    tokenizer: str
    vocab: str
    tokenizer_digest: str
    vocab_size: int
    mask_id: int
    sep_id: int
    pad_id: int
    ignore_index: int
    packing: str
    sampling: str
    corruption: Corruption
    seed: int
    corpus_fingerprint: str
    val_messages: int
    token_counts: bytes
    epoch_rows: int = 0
    sources: tuple[SourceInfo, ...] = ()

    def __post_init__(self) -> None:
        self._check_ids()
        _within("block_size", self.block_size, 2, MAX_BLOCK_SIZE)
        _within("rows_per_message", self.rows_per_message, 1, MAX_ROWS_PER_MESSAGE)
        _within("seed", self.seed, 0, MAX_SEED)
        _within("val_messages", self.val_messages, 0, 1 << 31)
        _within("epoch_rows", self.epoch_rows, 0, MAX_SEED)
        if self.epoch_rows and self.sampling != "epoch":
            raise MetaError("meta field epoch_rows is set, but only epoch sampling has epochs")
        for name, choices in (("packing", PACKINGS), ("sampling", SAMPLINGS)):
            if getattr(self, name) not in choices:
                raise MetaError(f"meta field {name} {getattr(self, name)!r} is not one of {choices}")
        if not FINGERPRINT.fullmatch(self.corpus_fingerprint):
            raise MetaError("meta field corpus_fingerprint must be 16 lowercase hex digits")
        if type(self.token_counts) is not bytes or len(self.token_counts) != COUNT_DTYPE.itemsize * self.base_size:
            raise MetaError(f"token_counts must be {self.base_size} little-endian uint64 ({COUNT_DTYPE.itemsize * self.base_size} "
                            f"bytes), got {type(self.token_counts).__name__} of {len(self.token_counts)}")
        if not isinstance(self.corruption, Corruption):
            raise MetaError(f"meta field corruption must be a Corruption, got {type(self.corruption).__name__}")
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.sources:
            _check_mixture(self)

    def _check_ids(self) -> None:
        if self.tokenizer not in TOKENIZER_KINDS:
            raise MetaError(f"meta field tokenizer {self.tokenizer!r} is not one of {TOKENIZER_KINDS}")
        try:
            specials = SpecialIds(self.mask_id)
        except VocabularyError as error:
            raise MetaError(f"meta field mask_id: {error}") from None
        if self.ignore_index != IGNORE_INDEX:
            raise MetaError(f"meta field ignore_index is {self.ignore_index!r}, not {IGNORE_INDEX}")
        ids = (self.mask_id, self.sep_id, self.pad_id, self.vocab_size)
        if ids != (specials.mask_id, specials.sep_id, specials.pad_id, specials.vocab_size):
            raise MetaError(f"meta fields mask_id, sep_id, pad_id, vocab_size are {ids}: they must be V0, V0+1, V0+2, V0+3")
        if not SHA256.fullmatch(self.tokenizer_digest):
            raise MetaError("meta field tokenizer_digest must be 64 lowercase hex digits")
        if self.tokenizer == "char":
            try:
                tokenizer = CharTokenizer(self.vocab)
            except VocabularyError as error:
                raise MetaError(f"meta field vocab: {error}") from None
            if tokenizer.base_size != self.base_size:
                raise MetaError(f"meta field vocab has {tokenizer.base_size} characters, mask_id says {self.base_size}")
        elif self.tokenizer == "bytes" and (self.vocab != "" or self.base_size != 256):
            raise MetaError("a bytes stream has an empty vocab and 256 base ids")
        elif self.tokenizer == "hf" and not self.vocab:
            raise MetaError("an hf stream carries its tokenizer JSON in vocab")
        if self.tokenizer != "bytes" and self.tokenizer_digest != sha256_hex(self.vocab.encode("utf-8")):
            raise MetaError("meta field tokenizer_digest is not the SHA-256 of vocab")
        if self.tokenizer == "hf":
            base_size = _hf_base_size(self.vocab, self.tokenizer_digest)
            if base_size != self.base_size:
                raise MetaError(f"meta field vocab is a tokenizer of {base_size} base ids, mask_id says {self.base_size}")

    @classmethod
    def build(cls, tokenizer: Tokenizer, corruption: Corruption, token_counts, **rest: Any) -> StreamMeta:
        """A meta whose tokenizer fields and special ids come from ``tokenizer``."""
        return cls(
            tokenizer=tokenizer.kind,
            vocab=tokenizer.definition,
            tokenizer_digest=tokenizer.digest,
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask_id,
            sep_id=tokenizer.sep_id,
            pad_id=tokenizer.pad_id,
            ignore_index=IGNORE_INDEX,
            corruption=corruption,
            token_counts=_counts_bytes(token_counts),
            **rest,
        )

    @classmethod
    def from_dict(cls, data: Any) -> StreamMeta:
        """Parse the plain form (:meth:`to_dict`: ``token_counts`` a list of integers, as protocol-2
        meta messages and checkpoints hold it); raises :class:`MetaError` on any missing, extra or
        mistyped field."""
        cls._check_types(data, wire=False)
        return cls(**{**data, "corruption": _parse_corruption(data["corruption"]), "token_counts": _counts_bytes(data["token_counts"]),
                      **_parse_sources(data, wire=False)})

    @classmethod
    def from_wire(cls, data: Any) -> StreamMeta:
        """Parse the wire form of protocol 3 (:meth:`to_wire`: ``token_counts`` raw bytes)."""
        cls._check_types(data, wire=True)
        return cls(**{**data, "corruption": _parse_corruption(data["corruption"]), **_parse_sources(data, wire=True)})

    @classmethod
    def _check_types(cls, data: Any, wire: bool) -> None:
        if not isinstance(data, dict):
            raise MetaError("meta is not a map")
        names = [f.name for f in fields(cls)]
        missing = sorted(set(names) - set(data) - {"epoch_rows", "sources"})
        extra = sorted(set(map(str, data)) - set(names))
        if missing or extra:
            raise MetaError(f"meta fields missing {missing} / unknown {extra}")
        for f in fields(cls):
            if f.name not in data or f.name == "sources":
                continue
            value = data[f.name]
            if f.name == "token_counts" and not wire:
                if not isinstance(value, (list, tuple)) or not all(type(c) is int and 0 <= c <= MAX_COUNT for c in value):
                    raise MetaError("meta field token_counts must be a list of integers in 0..2^64-1")
            elif type(value) is not {"int": int, "str": str, "bytes": bytes, "Corruption": str}[f.type]:
                raise MetaError(f"meta field {f.name} must be {'str' if f.name == 'corruption' else f.type}, "
                                f"got {type(value).__name__}")

    @classmethod
    def from_v1_dict(cls, data: Any) -> StreamMeta:
        """A protocol-1 meta (characters only, no tokenizer fields), as old recordings hold it."""
        if not isinstance(data, dict) or type(data.get("vocab")) is not str:
            raise MetaError("a version-1 meta is a map with a vocab string")
        upgraded = {**data, "tokenizer": "char", "tokenizer_digest": sha256_hex(data["vocab"].encode("utf-8"))}
        return cls.from_dict(upgraded)

    def to_dict(self) -> dict[str, Any]:
        """The plain form: a new dict of JSON values (``token_counts`` as a list of integers), what
        the digest is computed over and checkpoints keep."""
        data = {**self.to_wire(), "token_counts": self.counts.tolist()}
        if self.sources:
            data["sources"] = [source.to_dict() for source in self.sources]
        return data

    def to_wire(self) -> dict[str, Any]:
        """The wire form of protocol 3: a new dict of the fields (``token_counts`` as raw bytes)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["corruption"] = self.corruption.json_text
        if not self.epoch_rows:
            del data["epoch_rows"]
        if self.sources:
            data["sources"] = [source.to_wire() for source in self.sources]
        else:
            del data["sources"]
        return data

    @property
    def counts(self) -> np.ndarray:
        """``token_counts`` as a read-only uint64 array (V0,), a view of the bytes."""
        return np.frombuffer(self.token_counts, dtype=COUNT_DTYPE)

    @property
    def nbytes(self) -> int:
        """Approximate memory held by this meta, in bytes: its vocabulary, counts and corruption."""
        return (sys.getsizeof(self.vocab) + len(self.token_counts) + sys.getsizeof(self.corruption.json_text)
                + sum(len(source.token_counts) for source in self.sources))

    @cached_property
    def digest(self) -> str:
        """Stable hash: first 16 hex digits of SHA-256 over the canonical JSON of the meta
        (:meth:`to_dict`), the counts written in chunks so that no list of V0 ints is made."""
        return _digest(self)

    @cached_property
    def mixture(self) -> Mixture | None:
        """The row -> source assignment of a mixture (:class:`~shared.mixture.Mixture`), None for a single corpus."""
        return Mixture(self.sources) if self.sources else None

    @property
    def base_size(self) -> int:
        """V0, the number of base ids."""
        return self.mask_id

    @cached_property
    def tokens(self) -> Tokenizer:
        """The stream's tokenizer, rebuilt from the meta (for decoding)."""
        return tokenizer_from_definition(self.tokenizer, self.vocab)

    def summary(self) -> MetaSummary:
        """The meta without the per-id counts and the vocabulary itself (for diagnostics)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SUMMARY_OMITS}
        data["corruption"] = self.corruption.to_dict()
        data["sources"] = tuple(source.summary() for source in self.sources)
        return MetaSummary(**data, base_size=self.base_size, content_tokens=int(self.counts.sum()), digest=self.digest)

    def differences(self, other: StreamMeta) -> list[tuple[str, Any, Any]]:
        """``(field, self value, other value)`` for every field that differs, in field order; the
        sources' differences first, each named ``sources.NAME.FIELD`` (``sources`` when their
        names differ), as the corpus fingerprint then differs too."""
        found = [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if f.name != "sources" and getattr(self, f.name) != getattr(other, f.name)
        ]
        return _sources_differences(self.sources, other.sources) + found


def _digest(meta: StreamMeta) -> str:
    """:attr:`StreamMeta.digest` of ``meta``."""
    data = {**meta.to_wire(), "token_counts": []}
    if meta.sources:
        data["sources"] = [{**source.to_wire(), "token_counts": []} for source in meta.sources]
    # The key appears once per counts array, in the order of the text ("sources" sorts before
    # "token_counts"), and never inside a string: there a quote would be escaped (\").
    pieces = canonical_json(data).split('"token_counts":[]')
    sha = hashlib.sha256(pieces[0].encode())
    for counts, piece in zip([*(source.counts for source in meta.sources), meta.counts], pieces[1:]):
        _hash_counts(sha, counts)
        sha.update(piece.encode())
    return short_hex(sha)


# tokenizer_digest -> V0 of the hf tokenizers that loaded: a meta repeating one is not loaded again.
_HF_BASE_SIZES: collections.OrderedDict[str, int] = collections.OrderedDict()
_HF_BASE_SIZES_KEPT = 64


def _hf_base_size(definition: str, digest: str) -> int:
    """V0 of the ``tokenizers`` JSON ``definition`` (whose SHA-256 is ``digest``, checked before);
    raises MetaError when it does not load, so a forged hf meta is refused before it is pinned."""
    if digest in _HF_BASE_SIZES:
        _HF_BASE_SIZES.move_to_end(digest)
        return _HF_BASE_SIZES[digest]
    try:
        base_size = HFTokenizer(definition).base_size
    except VocabularyError as error:
        raise MetaError(f"meta field vocab: {error}") from None
    _HF_BASE_SIZES[digest] = base_size
    while len(_HF_BASE_SIZES) > _HF_BASE_SIZES_KEPT:
        _HF_BASE_SIZES.popitem(last=False)
    return base_size


def _counts_bytes(counts: Any) -> bytes:
    """``counts`` (any sequence or array of integers in 0..2^64-1) as little-endian uint64 bytes."""
    array = np.asarray(counts)
    if array.ndim != 1 or (array.size and (array.dtype.kind not in "iu" or int(array.min()) < 0)):
        raise MetaError("token_counts must be a sequence of non-negative integers")
    return array.astype(COUNT_DTYPE).tobytes()


def _sources_differences(mine: tuple[SourceInfo, ...], theirs: tuple[SourceInfo, ...]) -> list[tuple[str, Any, Any]]:
    """``("sources", names, names)`` when the names differ, else ``("sources.NAME.FIELD", a, b)`` per differing field."""
    names = [s.name for s in mine], [s.name for s in theirs]
    if names[0] != names[1]:
        return [("sources", *names)]
    return [(f"sources.{a.name}.{name}", *values) for a, b in zip(mine, theirs) for name, *values in source_differences(a, b)]


def _hash_counts(sha: Any, counts: np.ndarray) -> None:
    """Feeds ``"token_counts":[c0,c1,...]`` to ``sha`` in chunks (no list of V0 ints is made)."""
    sha.update(b'"token_counts":[')
    for start in range(0, len(counts), DIGEST_CHUNK):
        sha.update(("," if start else "").encode() + ",".join(map(str, counts[start:start + DIGEST_CHUNK].tolist())).encode())
    sha.update(b"]")


def _check_mixture(meta: StreamMeta) -> None:
    """Raises MetaError unless a mixture meta's sources, epochs and fingerprint agree."""
    try:
        check_sources(meta.sources, meta.base_size)
    except MixtureError as error:
        raise MetaError(f"meta field sources: {error}") from None
    if meta.epoch_rows:
        raise MetaError("meta field epoch_rows is set, but a mixture's epochs are its sources' (sources[].epoch_rows)")
    if bool(meta.sources[0].epoch_rows) != (meta.sampling == "epoch"):
        raise MetaError("meta field sources: epoch_rows are set exactly with epoch sampling")
    if meta.corpus_fingerprint != mixture_fingerprint(meta.sources):
        raise MetaError("meta field corpus_fingerprint is not the fingerprint of the sources")
    try:
        meta.mixture  # noqa: B018 (built here, its cost bounded: a meta that cannot have one is refused)
    except MixtureError as error:
        raise MetaError(f"meta field sources: {error}") from None


def _parse_sources(data: dict, wire: bool) -> dict[str, tuple[SourceInfo, ...]]:
    """``{"sources": ...}`` parsed from a meta map that has them, else ``{}``."""
    if "sources" not in data:
        return {}
    if not isinstance(data["sources"], (list, tuple)) or not data["sources"]:
        raise MetaError("meta field sources must be a non-empty array of source maps (absent for a single corpus)")
    try:
        return {"sources": tuple(SourceInfo.parse(source, wire) for source in data["sources"])}
    except MixtureError as error:
        raise MetaError(f"meta field sources: {error}") from None


def mixture_fingerprint(sources: tuple[SourceInfo, ...]) -> str:
    """A mixture's ``corpus_fingerprint``: 16 hex digits of SHA-256 over the canonical JSON of the
    list of its sources' ``name``, ``weight``, ``corpus_fingerprint`` and ``max_epochs`` (in order)."""
    covered = [{"name": s.name, "weight": s.weight, "corpus_fingerprint": s.corpus_fingerprint, "max_epochs": s.max_epochs}
               for s in sources]
    return short_sha256(canonical_json(covered).encode())


def mixed_counts(sources: tuple[SourceInfo, ...]) -> np.ndarray:
    """A mixture's ``token_counts``: each source's unigram distribution weighted by its share,
    scaled to the sources' total count and rounded: int64 (V0,), the floor of the mixed stream."""
    total = sum(int(s.counts.sum()) for s in sources)
    weights = np.array([s.weight for s in sources]) / sum(s.weight for s in sources)
    mixed = sum(w * s.counts / max(int(s.counts.sum()), 1) for w, s in zip(weights, sources))
    return np.rint(mixed * total).astype(np.int64)
def _parse_corruption(text: str) -> Corruption:
    try:
        return Corruption.from_json(text)
    except CorruptionError as error:
        raise MetaError(str(error)) from None


def _within(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise MetaError(f"meta field {name} {value} is outside {low}..{high}")


SUMMARY_OMITS = ("vocab", "token_counts")  # large, and in the meta only for decoding and the floor
# StreamMeta without SUMMARY_OMITS, the corruption parsed, and three derived numbers: V0
# (base_size), the sum of the counts (content_tokens) and the digest. Derived from StreamMeta's
# fields so that a new meta field reaches the diagnostics without a second declaration.
MetaSummary = dataclasses.make_dataclass(
    "MetaSummary",
    [(f.name, {"corruption": dict[str, Any], "sources": tuple[SourceSummary, ...]}.get(f.name, f.type))
     for f in fields(StreamMeta) if f.name not in SUMMARY_OMITS]
    + [("base_size", int), ("content_tokens", int), ("digest", str)],
    frozen=True,
)
