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
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import numpy as np

from producer.corpus import Corpus, load_corpus, tokenize
from producer.corruption import corrupt, mask_ratio
from producer.lines import Lines, TokenCorpus
from producer.packing import FixedPacker, LinePacker
from producer.packs import MappedPacks, epoch_packs
from producer.permutation import ROUNDS, KeyedPermutation
from producer.selection import select
from shared.data_config import DataConfig
from shared.limits import MAX_VAL_ROWS
from shared.meta import StreamMeta

DEFAULT_PRODUCER_ID = "0"
# A memory-mapped corpus is read a few rows at a time; every so many rows the producer drops its
# resident pages (the page cache keeps them), so its memory stays flat however long it runs and
# whatever the corpus size. A row's first read maps about 80 KB (the kernel maps the pages around
# a fault; huge pages are turned off for the map), so this bounds the mapped resident size near
# 512 x 80 KB = 40 MB; dropping them more often costs page faults (every 128 rows: 2.5x slower at block 128).
RELEASE_EVERY_ROWS = 512
# The epoch shuffle is computed this many positions at a time (32 KB), so its cost per message is
# a slice, not a Feistel network per row, and its memory stays flat in the corpus size.
ORDER_PIECE = 4096
_TRAIN, _EPOCH, _VAL = 1, 2, 3  # domain tags: the three seed streams never coincide

Batch = dict[str, np.ndarray]


class BatchStream:
    """The train and val messages of a stream (the same in every producer). Batches are dicts of wire-dtype arrays:
    ``x`` uint16 or uint32 (R, T), ``y`` int16 or int32 (R, T) (the widths follow the vocabulary:
    :func:`shared.vocab.id_dtype`), ``attention_mask`` uint8 (R, T), ``mask_ratio``
    float32 (R,), and ``stage`` uint8 (R,) with the stages policy."""

    def __init__(self, config: DataConfig, corpus: Corpus | TokenCorpus | None = None) -> None:
        self.config = config
        self.producer_id = config.producer_id if config.producer_id is not None else DEFAULT_PRODUCER_ID
        if isinstance(corpus, Corpus):
            corpus = tokenize(corpus, config.tokenizer or "char", 0.1 if config.val_fraction is None else config.val_fraction)
        self.corpus = corpus if corpus is not None else load_corpus(config.corpus, config.tokenizer, config.val_fraction,
                                                                                config.text_field)
        self.tokenizer = self.corpus.tokenizer
        train, val = self.corpus.train_lines(), self.corpus.val_lines()
        self._rows_since_release = 0
        self._train_packer = self._packer(train)
        self._val_packer = self._packer(val) if val is not None else None
        self.corruption = config.corruption()
        self._val_starts = (
            self._val_packer.greedy_starts(MAX_VAL_ROWS) if self._val_packer is not None else np.zeros(0, np.int64)
        )
        self._epoch_packs = epoch_packs(self._train_packer, self.corpus.fingerprint) if config.sampling == "epoch" else None
        self._val_set: list[Batch] | None = None
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        rows = config.rows_per_message
        self.meta = StreamMeta.build(
            self.tokenizer,
            self.corruption,
            self.corpus.train_counts,
            block_size=config.block_size,
            rows_per_message=rows,
            packing=config.packing,
            sampling=config.sampling,
            seed=config.seed,
            corpus_fingerprint=self.corpus.fingerprint,
            val_messages=-(-len(self._val_starts) // rows),
            epoch_rows=0 if self._epoch_packs is None else len(self._epoch_packs),
        )

    def _packer(self, lines: Lines) -> LinePacker | FixedPacker:
        if self.config.packing == "fixed":
            return FixedPacker(lines, self.config.block_size)
        return LinePacker(lines, self.config.block_size, self.tokenizer.sep_id, self.tokenizer.pad_id)

    @property
    def packs_per_epoch(self) -> int:
        """Rows in one epoch (epoch sampling): the greedy packs of the train lines."""
        if self._epoch_packs is None:
            raise ValueError("packs_per_epoch needs --sampling epoch")
        return len(self._epoch_packs)

    def train_message(self, k: int) -> Batch:
        """Train message ``k`` of the schedule (k >= 0): the same in every producer."""
        if k < 0:
            raise ValueError(f"train message index {k} is negative")
        rows = self.config.rows_per_message
        rng = self._rng(_TRAIN, k)
        if self._epoch_packs is None:
            return self._batch(rng, self._train_packer, self._train_packer.random_starts(rng, rows), "train")
        epoch_of, index_of = np.divmod(k * rows + np.arange(rows, dtype=np.int64), len(self._epoch_packs))
        positions = np.empty(rows, dtype=np.int64)
        # One piece, or two when the message straddles a piece or an epoch (more only for tiny corpora).
        piece_of = index_of // ORDER_PIECE
        for epoch, piece in set(zip(epoch_of.tolist(), piece_of.tolist())):
            here = (epoch_of == epoch) & (piece_of == piece)
            positions[here] = self._order_piece(epoch, piece)[index_of[here] - piece * ORDER_PIECE]
        return self._batch(rng, self._train_packer, self._epoch_packs[positions], "train")

    def train_batches(self, start: int = 0) -> Iterator[Batch]:
        """Train messages ``start, start + 1, ...`` for ever."""
        for k in count(start):
            yield self.train_message(k)

    def _order_piece(self, epoch: int, piece: int) -> np.ndarray:
        """Positions ``piece * ORDER_PIECE ..`` of epoch ``epoch``'s shuffle of the packs (the
        last few pieces kept: consecutive messages read the same piece)."""
        key = (epoch, piece)
        if key not in self._orders:
            if len(self._orders) >= 4:
                del self._orders[next(iter(self._orders))]
            seeds = np.random.SeedSequence([self.config.seed, _EPOCH, epoch]).generate_state(ROUNDS, np.uint64)
            permutation = KeyedPermutation(len(self._epoch_packs), seeds)
            first = piece * ORDER_PIECE
            self._orders[key] = permutation(np.arange(first, min(first + ORDER_PIECE, len(self._epoch_packs))))
        return self._orders[key]

    def val_set(self) -> list[Batch]:
        """The fixed val set: ``meta.val_messages`` batches, the same for every producer id."""
        if self._val_set is None:
            rng = self._rng(_VAL)
            rows = self.config.rows_per_message
            chunks = [self._val_starts[i : i + rows] for i in range(0, len(self._val_starts), rows)]
            self._val_set = [self._batch(rng, self._val_packer, starts, "val") for starts in chunks]
        return self._val_set

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.config.seed, *words])))

    def _batch(self, rng: np.random.Generator, packer: LinePacker | FixedPacker, starts: np.ndarray, split: str) -> Batch:
        packed = packer.pack(starts)
        n_candidates = self.corruption.candidates(packed.content_len, self.config.packing)
        block_size = self.config.block_size
        selection = select(self.corruption.policy, rng, n_candidates, block_size, split)
        x = packed.x
        y = corrupt(rng, x, selection, self.config.mask_fractions, self.tokenizer.base_size, self.tokenizer.mask_id)
        self._rows_since_release += len(x)
        if self._rows_since_release >= RELEASE_EVERY_ROWS:
            self.corpus.release_pages()
            if isinstance(self._epoch_packs, MappedPacks):
                self._epoch_packs.release()
            self._rows_since_release = 0
        batch = {
            "x": x,
            "y": y,
            "attention_mask": packed.attention_mask,
            "mask_ratio": mask_ratio(selection.supervised, n_candidates),
        }
        if selection.stage is not None:
            batch["stage"] = selection.stage
        return batch

