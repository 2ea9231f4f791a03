"""The corpus as token lines: from text (tokenized in memory) or from a prepared folder
(memory-mapped), and its train/val split by lines (docs/SPEC.md §2.2, §2.7).

A line is its text plus its terminating ``\\n``; a text whose last line has no ``\\n`` gets
one, so every line has one. Lines, not tokens, are split: the first ``1 - val_fraction`` of
them are train, the rest val. Line boundaries are explicit (``offsets``), whatever the tokenizer.

Small corpora can stay text: :func:`load_corpus` tokenizes them in memory. A large one is
prepared once (``python -m producer prepare``, :mod:`producer.prepare`) and memory-mapped by
every producer (:mod:`producer.prepared`): no full-text copy, start-up and memory flat in its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from producer import sources
from producer.lines import CorpusError, TokenCorpus, split_point
from producer.prepared import is_prepared, open_prepared
from shared.data_config import DEFAULT_VAL_FRACTION
from shared.digest import short_sha256
from shared.tokenizer import Tokenizer, load_tokenizer
from shared.vocab import VocabularyError, id_dtype

BUILTIN_NAME = "builtin:pydoc_data.topics"


@dataclass(frozen=True)
class Corpus:
    """A text corpus as read: the text (ends with ``\\n``), where it came from, and its
    fingerprint (first 16 hex digits of the SHA-256 of the UTF-8 text)."""

    text: str
    name: str
    fingerprint: str


def read_text(path: str | None, text_field: str | None = None) -> Corpus:
    """The corpus at ``path`` read as ``prepare`` reads it (:mod:`producer.sources`: a UTF-8 file,
    or a folder read recursively in sorted order; ``.txt``, ``.jsonl`` whose ``text_field`` holds
    each document, ``.gz`` of either), or CPython's built-in help text when ``path`` is None.
    Raises :class:`CorpusError`."""
    if path is None:
        from pydoc_data.topics import topics

        pieces, name = [topics[key] for key in sorted(topics)], BUILTIN_NAME
    else:
        chunks = sources.chunks(sources.list_sources(path, text_field), sources.READ_CHUNK_BYTES)
        pieces, name = [sources.chunk_text(chunk, text_field).text for chunk in chunks], str(Path(path))
    text = "".join(piece if piece.endswith("\n") else piece + "\n" for piece in pieces if piece)
    if not text.strip("\n"):
        raise CorpusError(f"corpus {name} is empty (it has no characters besides line breaks)")
    return Corpus(text, name, short_sha256(text.encode("utf-8")))


def tokenize(corpus: Corpus, tokenizer: str | Tokenizer = "char", val_fraction: float | None = None) -> TokenCorpus:
    """A text corpus tokenized in memory, line by line (``tokenizer``: ``char``, ``bytes``, a
    ``tokenizers`` file, or a :class:`Tokenizer`; ``val_fraction`` None: :data:`DEFAULT_VAL_FRACTION`)."""
    try:
        tokens = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer, corpus.text)
        ids, lengths = tokens.encode_text(corpus.text)
    except VocabularyError as error:
        raise CorpusError(f"corpus {corpus.name}: {error}") from None
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    split = split_point(len(lengths), DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction)
    train_ids = ids[: offsets[split]]
    return TokenCorpus(
        name=corpus.name,
        fingerprint=corpus.fingerprint,
        tokenizer=tokens,
        tokens=ids.astype(id_dtype(tokens.vocab_size)),
        offsets=offsets,
        split_line=split,
        train_counts=np.bincount(train_ids, minlength=tokens.base_size).astype(np.int64),
    )


def load_corpus(path: str | None, tokenizer: str | None = None, val_fraction: float | None = None,
                text_field: str | None = None) -> TokenCorpus:
    """The corpus at ``path``: a prepared folder (memory-mapped; ``tokenizer`` and ``val_fraction``
    must agree with its own when given), or text (:func:`read_text`, ``.jsonl`` by its
    ``text_field``) tokenized in memory (``tokenizer`` defaults to ``char``, ``val_fraction`` to
    0.1). Raises :class:`CorpusError`."""
    if path is not None and is_prepared(path):
        return open_prepared(path, tokenizer, val_fraction)
    return tokenize(read_text(path, text_field), tokenizer or "char", val_fraction)
