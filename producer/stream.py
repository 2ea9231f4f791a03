"""The messages of a stream: packing + corruption as a pure function of (config, corpus, seed, index)
(docs/SPEC.md §2.6).

Randomness comes only from ``numpy.random.SeedSequence``; the producer id never enters it, so
every producer computes the same message for the same index, and the trainer can order any
message from any producer (the schedule, docs/SPEC.md §2.8):

- train message k: ``SeedSequence([seed, TRAIN, k])`` draws its corruption and, with random
  sampling, its rows' start lines. With epoch sampling its rows are the packs at positions
  ``k*R .. k*R + R - 1`` of the run's pack sequence: epoch ``e`` is a permutation of every
  greedy pack of the train lines (:class:`~producer.permutation.KeyedPermutation`, keyed by
  ``SeedSequence([seed, EPOCH, e])``), so every train line lies in exactly one row per epoch,
  and any k is computed in the same time and memory, whatever k and the corpus size.
- val set: ``SeedSequence([seed, VAL])``. The val set is the val lines packed greedily in
  corpus order (every val line once) and cut at :data:`MAX_VAL_ROWS` rows, in messages of
  ``rows_per_message`` rows (the last may be shorter), corrupted by the val stages for the
  stages policy and by the train policy otherwise.

``meta.corruption`` (``shared.corruption.Corruption``) describes the corruption completely
(the context-free floor is computed from it).

A mixture (several ``--corpus``, or ``--mixture``; docs/SPEC.md §2.9) gives row ``i = k*R + j``
to a source by :class:`shared.mixture.Mixture` (a pure function of i and the meta); the row is
that source's row number ``c_s(i)``: with epoch sampling its pack at that position of the
source's own epochs (each keyed by ``SeedSequence([seed, SOURCE_EPOCH, s, e])``), with random
sampling a start line of that source drawn from the message's generator (source by source, in
source order). Rows never mix sources; every message carries ``source``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

import numpy as np

from producer.corpus import Corpus, load_corpus, tokenize
from producer.corruption import corrupt, mask_ratio
from producer.lines import TokenCorpus
from producer.mixture import declared_sources, load_sources
from producer.packing import Packed, pack_pieces
from producer.selection import select
from producer.source_rows import SourceRows
from shared.data_config import DataConfig
from shared.limits import MAX_VAL_ROWS, MIN_VAL_ROWS_PER_SOURCE
from shared.meta import StreamMeta, mixed_counts, mixture_fingerprint
from shared.mixture import SOURCE_DTYPE, Mixture, MixtureExhausted, SourceInfo

DEFAULT_PRODUCER_ID = "0"
_TRAIN, _EPOCH, _VAL, _SOURCE_EPOCH = 1, 2, 3, 4  # domain tags: the seed streams never coincide

LAYOUTS_KEPT = 64  # message layouts of a mixture kept, by the message's first row modulo the period

Batch = dict[str, np.ndarray]
# The rows of a message: (source index, its rows' starts, their places in the message) per source.
Parts = list[tuple[int, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Layout:
    """Where a mixture message's rows come from: ``source`` uint8 (R,) per row and ``places``
    ``(s, rows of source s)`` (int64) for each source present."""

    source: np.ndarray
    places: tuple[tuple[int, np.ndarray], ...]

    @classmethod
    def of(cls, source: np.ndarray, n_sources: int) -> Layout:
        return cls(source, tuple((s, p) for s in range(n_sources) if len(p := np.flatnonzero(source == s))))


class BatchStream:
    """The train and val messages of a stream (the same in every producer). Batches are dicts of wire-dtype arrays:
    ``x`` uint16 or uint32 (R, T), ``y`` int16 or int32 (R, T) (the widths follow the vocabulary:
    :func:`shared.vocab.id_dtype`), ``attention_mask`` uint8 (R, T), ``mask_ratio``
    float32 (R,), ``stage`` uint8 (R,) with the stages policy, ``source`` uint8 (R,) for a mixture."""

    def __init__(self, config: DataConfig, corpus: Corpus | TokenCorpus | list[TokenCorpus] | None = None) -> None:
        self.config = config
        self.producer_id = config.producer_id if config.producer_id is not None else DEFAULT_PRODUCER_ID
        specs = declared_sources(config)
        if isinstance(corpus, Corpus):
            corpus = tokenize(corpus, config.tokenizer or "char", config.val_fraction)
        if corpus is None:
            corpus = load_sources(specs, config) if len(specs) > 1 else load_corpus(
                specs[0].path if specs else None, config.tokenizer, config.val_fraction, config.text_field)
        corpora = corpus if isinstance(corpus, list) else [corpus]
        self.corpus = corpora[0]
        self.tokenizer = self.corpus.tokenizer
        self.corruption = config.corruption()
        if len(corpora) == 1:
            self.sources = [SourceRows(self.corpus, config, (config.seed, _EPOCH))]
            infos: tuple[SourceInfo, ...] = ()
        else:
            self.sources = [SourceRows(c, config, (config.seed, _SOURCE_EPOCH, s)) for s, c in enumerate(corpora)]
            infos = tuple(SourceInfo(spec.name, spec.weight, c.fingerprint, spec.max_epochs, rows.epoch_rows,
                                     c.train_counts.astype("<u8").tobytes())
                          for spec, c, rows in zip(specs, corpora, self.sources))
        self.mixture = Mixture(infos) if infos else None
        self._val_rows = self._val_plan()
        self.meta = self._meta(infos, val_messages=-(-len(self._val_rows[0]) // config.rows_per_message))
        self._val_set: list[Batch] | None = None
        self._layouts: dict[int, tuple[Layout, np.ndarray, np.ndarray]] = {}

    def _meta(self, infos: tuple[SourceInfo, ...], val_messages: int) -> StreamMeta:
        config = self.config
        return StreamMeta.build(
            self.tokenizer,
            self.corruption,
            mixed_counts(infos) if infos else self.corpus.train_counts,
            block_size=config.block_size,
            rows_per_message=config.rows_per_message,
            packing=config.packing,
            sampling=config.sampling,
            seed=config.seed,
            corpus_fingerprint=mixture_fingerprint(infos) if infos else self.corpus.fingerprint,
            val_messages=val_messages,
            epoch_rows=0 if infos else self.sources[0].epoch_rows,
            sources=infos,
        )

    def _val_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """``(source, start)`` int64 arrays of the val rows in order: the single corpus's first
        MAX_VAL_ROWS greedy val packs; a mixture's sources' in proportion (PROTOCOL §4.4)."""
        if self.mixture is None:
            starts = self.sources[0].val_starts(MAX_VAL_ROWS)
            return np.zeros(len(starts), np.int64), starts
        wanted = np.maximum(self.mixture.period.counts_before(np.array([MAX_VAL_ROWS]))[0], MIN_VAL_ROWS_PER_SOURCE)
        starts = [rows.val_starts(int(n)) for rows, n in zip(self.sources, wanted)]
        return np.repeat(np.arange(len(starts)), [len(s) for s in starts]), np.concatenate(starts)

    @property
    def packs_per_epoch(self) -> int:
        """Rows in one epoch (epoch sampling, a single corpus): the greedy packs of the train lines."""
        if self.sources[0].epoch_packs is None or self.mixture is not None:
            raise ValueError("packs_per_epoch needs --sampling epoch and a single corpus")
        return self.sources[0].epoch_rows

    def train_message(self, k: int) -> Batch:
        """Train message ``k`` of the schedule (k >= 0): the same in every producer. Raises
        :class:`~shared.mixture.MixtureExhausted` past the end of a mixture whose every source has a max_epochs."""
        if k < 0:
            raise ValueError(f"train message index {k} is negative")
        rows = self.config.rows_per_message
        rng = self._rng(_TRAIN, k)
        everything = np.arange(rows)
        if self.mixture is None:
            source = self.sources[0]
            starts = (source.train_packer.random_starts(rng, rows) if source.epoch_packs is None
                      else source.epoch_starts(k * rows + everything))
            return self._batch(rng, [(0, starts, everything)], "train")
        layout, index = self._layout(k)
        parts: Parts = []
        for s, places in layout.places:
            source = self.sources[s]
            starts = (source.train_packer.random_starts(rng, len(places)) if source.epoch_packs is None
                      else source.epoch_starts(index[places]))
            parts.append((s, starts, places))
        return self._batch(rng, parts, "train", layout)

    def _layout(self, k: int) -> tuple[Layout, np.ndarray]:
        """Message k's :class:`Layout` and each row's index within its source. Without max_epochs
        the layout depends only on the message's first row modulo the period, and the indexes on
        that and the number of whole periods before it: the last few are kept."""
        rows, mixture = self.config.rows_per_message, self.mixture
        if len(mixture.segments) > 1:
            source, index = mixture.assign(k * rows, k * rows + rows)
            return Layout.of(source, len(self.sources)), index
        periods, residue = divmod(k * rows, mixture.period.size)
        if residue not in self._layouts:
            if len(self._layouts) >= LAYOUTS_KEPT:
                del self._layouts[next(iter(self._layouts))]
            source, offset = mixture.assign(residue, residue + rows)
            self._layouts[residue] = (Layout.of(source, len(self.sources)), offset, mixture.period.parts[source])
        layout, offset, parts = self._layouts[residue]
        return layout, offset + periods * parts

    def train_batches(self, start: int = 0) -> Iterator[Batch]:
        """Train messages ``start, start + 1, ...`` for ever (or to the end of a mixture)."""
        try:
            for k in count(start):
                yield self.train_message(k)
        except MixtureExhausted:
            return

    def val_set(self) -> list[Batch]:
        """The fixed val set: ``meta.val_messages`` batches, the same for every producer id."""
        if self._val_set is None:
            rng = self._rng(_VAL)
            rows = self.config.rows_per_message
            sources, starts = self._val_rows
            self._val_set = []
            for first in range(0, len(starts), rows):
                layout = Layout.of(sources[first:first + rows].astype(SOURCE_DTYPE), len(self.sources))
                parts = [(s, starts[first:first + rows][places], places) for s, places in layout.places]
                self._val_set.append(self._batch(rng, parts, "val", layout if self.mixture is not None else None))
        return self._val_set

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.config.seed, *words])))

    def _pack(self, parts: Parts, split: str, layout: Layout | None) -> Packed:
        """The rows of ``parts``, each packed by its source, in message order (``layout.source``)."""
        def packer(s: int):
            return self.sources[s].train_packer if split == "train" else self.sources[s].val_packer

        if len(parts) == 1:
            s, starts, _ = parts[0]
            return packer(s).pack(starts)
        return pack_pieces([(packer(s), starts, places) for s, starts, places in parts], len(layout.source))

    def _batch(self, rng: np.random.Generator, parts: Parts, split: str, layout: Layout | None = None) -> Batch:
        packed = self._pack(parts, split, layout)
        n_candidates = self.corruption.candidates(packed.content_len, self.config.packing)
        block_size = self.config.block_size
        selection = select(self.corruption.policy, rng, n_candidates, block_size, split)
        x = packed.x
        y = corrupt(rng, x, selection, self.config.mask_fractions, self.tokenizer.base_size, self.tokenizer.mask_id)
        for s, _, places in parts:
            self.sources[s].read(len(places))
        batch = {
            "x": x,
            "y": y,
            "attention_mask": packed.attention_mask,
            "mask_ratio": mask_ratio(selection.supervised, n_candidates),
        }
        if selection.stage is not None:
            batch["stage"] = selection.stage
        if layout is not None:
            batch["source"] = layout.source.copy()
        return batch

