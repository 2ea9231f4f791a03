"""The stream of batches a producer sends: packing + corruption under a seed (docs/SPEC.md §2.6).

Randomness comes only from ``numpy.random.SeedSequence``. The producer id (a string) enters as
the eight 32-bit words of its SHA-256 digest, so every process and machine agrees:

- train message at position (epoch, index): ``SeedSequence([seed, TRAIN, *id_words, epoch, index])``
  draws its rows' starts (random sampling) and its corruption. The train stream is a pure
  function of (config, corpus, seed, producer id), and a stream resumed at a position equals
  the uninterrupted one from there on.
- epoch order (epoch sampling): ``SeedSequence([seed, EPOCH, *id_words, epoch])`` shuffles the packs.
- val set: ``SeedSequence([seed, VAL])``: no producer id, so every producer sends the same one.

The val set is the val lines packed greedily in corpus order (every val line once) and cut
at :data:`MAX_VAL_ROWS` rows, in messages of ``rows_per_message`` rows (the last may be shorter),
corrupted by the val stages for the stages policy and by the train policy otherwise.

``meta.corruption`` describes the policy completely (the context-free floor is computed from
it): ``policy`` and its parameters (``mask_prob``; ``ratio_range``; or ``stages`` with the
``train`` and ``val`` stage lists, each stage its ``type`` and parameters; span stages use
``[MASK]`` only), ``mask_fractions``, ``supervise_sep`` and ``random_token``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from producer.corpus import Corpus, load_corpus, tokenize
from producer.corruption import BertPolicy, UniformPolicy, corrupt, mask_ratio
from producer.lines import Lines, TokenCorpus
from producer.packing import FixedPacker, LinePacker
from producer.stages import EXAMPLE_STAGES, StagesPolicy, load_stage_plan
from shared.data_config import DataConfig
from shared.limits import MAX_VAL_ROWS
from shared.meta import StreamMeta

# How a "random" replacement is drawn, as the corruption description states it.
RANDOM_TOKEN = "uniform over the base ids other than the original"
DEFAULT_PRODUCER_ID = "0"
# A memory-mapped corpus is read a few rows at a time; every so many rows the producer drops its
# resident pages (the page cache keeps them), so its memory stays flat however long it runs and
# whatever the corpus size. A row's first read maps about 80 KB (the kernel maps the pages around
# a fault; huge pages are turned off for the map), so this bounds the mapped resident size near
# 512 x 80 KB = 40 MB; dropping them more often costs page faults (every 128 rows: 2.5x slower at block 128).
RELEASE_EVERY_ROWS = 512
_TRAIN, _EPOCH, _VAL = 1, 2, 3  # domain tags: the three seed streams never coincide

Batch = dict[str, np.ndarray]


def producer_id_words(producer_id: str) -> list[int]:
    """The producer id as eight 32-bit integers (its SHA-256 digest), for a SeedSequence."""
    digest = hashlib.sha256(producer_id.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 32, 4)]


class BatchStream:
    """Train and val batches of one producer. Batches are dicts of wire-dtype arrays:
    ``x`` uint16 or uint32 (R, T), ``y`` int16 or int32 (R, T) (the widths follow the vocabulary:
    :func:`shared.vocab.id_dtype`), ``attention_mask`` uint8 (R, T), ``mask_ratio``
    float32 (R,), and ``stage`` uint8 (R,) with the stages policy."""

    def __init__(self, config: DataConfig, corpus: Corpus | TokenCorpus | None = None) -> None:
        self.config = config
        self.producer_id = config.producer_id if config.producer_id is not None else DEFAULT_PRODUCER_ID
        if isinstance(corpus, Corpus):
            corpus = tokenize(corpus, config.tokenizer or "char", 0.1 if config.val_fraction is None else config.val_fraction)
        self.corpus = corpus if corpus is not None else load_corpus(config.corpus, config.tokenizer, config.val_fraction)
        self.tokenizer = self.corpus.tokenizer
        train, val = self.corpus.train_lines(), self.corpus.val_lines()
        self._rows_since_release = 0
        self._train_packer = self._packer(train)
        self._val_packer = self._packer(val) if val is not None else None
        self._policy = _policy(config)
        self._id_words = producer_id_words(self.producer_id)
        self._val_starts = (
            self._val_packer.greedy_starts(MAX_VAL_ROWS) if self._val_packer is not None else np.zeros(0, np.int64)
        )
        self._epoch_packs = self._train_packer.greedy_starts() if config.sampling == "epoch" else None
        self._val_set: list[Batch] | None = None
        self._orders: dict[int, np.ndarray] = {}
        rows = config.rows_per_message
        corruption = {
            **self._policy.describe(),
            "mask_fractions": list(config.mask_fractions),
            "supervise_sep": config.supervise_sep,
            "random_token": RANDOM_TOKEN,
        }
        self.meta = StreamMeta.build(
            self.tokenizer,
            corruption,
            self.corpus.train_counts,
            block_size=config.block_size,
            rows_per_message=rows,
            packing=config.packing,
            sampling=config.sampling,
            seed=config.seed,
            corpus_fingerprint=self.corpus.fingerprint,
            val_messages=-(-len(self._val_starts) // rows),
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

    def resume_position(self, messages: int, epoch: int = 0, index: int = 0) -> tuple[int, int]:
        """The ``(epoch, index)`` to pass to :meth:`train_batches` to continue after ``messages``
        messages of a stream started at ``(epoch, index)``."""
        if self._epoch_packs is None:
            return 0, index + messages
        return divmod(epoch * self.packs_per_epoch + index + messages * self.config.rows_per_message, self.packs_per_epoch)

    def train_batches(self, epoch: int = 0, index: int = 0) -> Iterator[Batch]:
        """The infinite train stream, from position ``(epoch, index)``.

        Random sampling: ``index`` counts messages (``epoch`` must be 0). Epoch sampling: the
        stream walks the packs of epoch 0 in their shuffled order, then epoch 1's, ...; a message
        takes the next ``rows_per_message`` packs (it may straddle two epochs) and ``index`` is
        the pack within ``epoch`` to start at. See :meth:`resume_position`.
        """
        if epoch < 0 or index < 0 or (self._epoch_packs is None and epoch != 0):
            raise ValueError(f"invalid stream position epoch={epoch} index={index}")
        rows = self.config.rows_per_message
        if self._epoch_packs is None:
            while True:
                rng = self._rng(_TRAIN, *self._id_words, 0, index)
                yield self._batch(rng, self._train_packer, self._train_packer.random_starts(rng, rows), "train")
                index += 1
        per_epoch = len(self._epoch_packs)
        position = epoch * per_epoch + index  # packs since the start of epoch 0
        while True:
            epoch_of, index_of = np.divmod(position + np.arange(rows), per_epoch)
            starts = np.empty(rows, dtype=np.int64)
            # One epoch, or two when the message straddles a boundary (more only for tiny corpora).
            for row_epoch in np.unique(epoch_of).tolist():
                here = epoch_of == row_epoch
                starts[here] = self._epoch_order(row_epoch)[index_of[here]]
            rng = self._rng(_TRAIN, *self._id_words, *divmod(position, per_epoch))
            yield self._batch(rng, self._train_packer, starts, "train")
            position += rows

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The packs (start lines or offsets) of ``epoch`` in their shuffled order (last two cached)."""
        if epoch not in self._orders:
            self._orders = {e: order for e, order in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self._rng(_EPOCH, *self._id_words, epoch).permutation(self._epoch_packs)
        return self._orders[epoch]

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
        n_candidates = packed.content_len
        if self.config.supervise_sep and self.config.packing == "lines":
            n_candidates = n_candidates + 1
        block_size = self.config.block_size
        selection = self._policy.select(rng, n_candidates, block_size, split)
        x = packed.x
        y = corrupt(rng, x, selection, self.config.mask_fractions, self.tokenizer.base_size, self.tokenizer.mask_id)
        self._rows_since_release += len(x)
        if self._rows_since_release >= RELEASE_EVERY_ROWS:
            self.corpus.release_pages()
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


def _policy(config: DataConfig):
    if config.policy == "bert":
        return BertPolicy(config.mask_prob)
    if config.policy == "uniform":
        return UniformPolicy(config.ratio_range)
    return StagesPolicy(load_stage_plan(config.stages if config.stages is not None else EXAMPLE_STAGES))
