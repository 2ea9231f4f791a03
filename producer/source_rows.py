"""The rows one corpus gives a stream (a single corpus, or one source of a mixture): its packers,
its val packs, and with epoch sampling its packs and their keyed shuffle per epoch
(docs/SPEC.md §2.8, §2.9)."""

from __future__ import annotations

import numpy as np

from producer.lines import Lines, TokenCorpus
from producer.packing import FixedPacker, LinePacker
from producer.packs import MappedTable, epoch_packs, row_lengths
from producer.permutation import ROUNDS, KeyedPermutation
from shared.data_config import DataConfig
from shared.digest import short_sha256

# A memory-mapped corpus is read a few rows at a time; every so many rows read from it the producer
# drops its resident pages (the page cache keeps them), so its memory stays flat however long it
# runs and whatever the corpus size. A row's first read maps up to 64 KB around each page it
# touches (the kernel maps the pages around a fault; huge pages are turned off for the map): its
# tokens, its line start and, above a million lines, its row length in the cached table, so one
# window maps some tens of MB a corpus (1.12 GB of `.py` files: 54 MB over 384 rows,
# docs/BENCHMARKS.md); dropping them more often costs page faults (every 128 rows: 2.5x slower at
# block 128). Counted per corpus: a mixture's small source is not released more often because
# another is read. A corpus whose mapped files (and mapped tables) are no larger than
# RELEASE_WINDOW_BYTES is never released: its resident pages cannot outgrow the files, and every
# release would only cost the faults that map them again (a 25 MB corpus at block 1024: 1.4x faster).
RELEASE_EVERY_ROWS = 512
RELEASE_WINDOW_BYTES = RELEASE_EVERY_ROWS * 96 * 1024  # 48 MiB: ~1.5 faults of 64 KB a row
# The epoch shuffle is computed this many positions at a time (32 KB), so its cost per message is
# a slice, not a Feistel network per row, and its memory stays flat in the corpus size.
ORDER_PIECE = 4096


class SourceRows:
    """Packers and epoch order of one corpus. ``epoch_words``: the ``SeedSequence`` words before
    the epoch number that key each epoch's shuffle (``[seed, EPOCH]`` for a single corpus,
    ``[seed, SOURCE_EPOCH, s]`` for source s of a mixture)."""

    def __init__(self, corpus: TokenCorpus, config: DataConfig, epoch_words: tuple[int, ...]) -> None:
        self.corpus = corpus
        self.config = config
        self.epoch_words = epoch_words
        # Names the corpus and its tokenizer in the cache (a text corpus's fingerprint is its text's).
        key = short_sha256(f"{corpus.fingerprint} {corpus.tokenizer.kind} {corpus.tokenizer.digest}".encode())
        self._tables: list[MappedTable] = []  # the cache files mapped (released with the corpus)
        self.train_packer = self._packer(corpus.train_lines(), f"{key}-train")
        val = corpus.val_lines()
        self.val_packer = self._packer(val, f"{key}-val") if val is not None else None
        self.epoch_packs = epoch_packs(self.train_packer, key) if config.sampling == "epoch" else None
        if isinstance(self.epoch_packs, MappedTable):
            self._tables.append(self.epoch_packs)
        corpus.release_pages()  # building the tables read the line starts (and the packs, the row lengths)
        for table in self._tables:
            table.release()
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._rows_since_release = 0
        self.releases_pages = corpus.mapped_bytes + sum(t.mapped_bytes for t in self._tables) > RELEASE_WINDOW_BYTES

    def _packer(self, lines: Lines, key: str) -> LinePacker | FixedPacker:
        block_size = self.config.block_size
        if self.config.packing == "fixed":
            return FixedPacker(lines, block_size)
        lengths = row_lengths(lines, block_size, key)
        if isinstance(lengths, MappedTable):
            self._tables.append(lengths)
        tokenizer = self.corpus.tokenizer
        return LinePacker(lines, block_size, tokenizer.sep_id, tokenizer.pad_id, lengths)

    @property
    def epoch_rows(self) -> int:
        """Rows in one epoch (epoch sampling): the greedy packs of the train lines; 0 with random sampling."""
        return 0 if self.epoch_packs is None else len(self.epoch_packs)

    def val_starts(self, max_rows: int) -> np.ndarray:
        """The first ``max_rows`` greedy val packs (none without a val split)."""
        return self.val_packer.greedy_starts(max_rows) if self.val_packer is not None else np.zeros(0, np.int64)

    def epoch_starts(self, positions: np.ndarray) -> np.ndarray:
        """The packs at ``positions`` (int64) of the sequence epoch 0, epoch 1, ... of this corpus."""
        epoch_of, index_of = np.divmod(positions, len(self.epoch_packs))
        found = np.empty(len(positions), dtype=np.int64)
        # One piece, or two when the rows straddle a piece or an epoch (more only for tiny corpora).
        piece_of = index_of // ORDER_PIECE
        for epoch, piece in set(zip(epoch_of.tolist(), piece_of.tolist())):
            here = (epoch_of == epoch) & (piece_of == piece)
            found[here] = self._order_piece(epoch, piece)[index_of[here] - piece * ORDER_PIECE]
        return self.epoch_packs[found]

    def _order_piece(self, epoch: int, piece: int) -> np.ndarray:
        """Positions ``piece * ORDER_PIECE ..`` of epoch ``epoch``'s shuffle of the packs (the
        last few pieces kept: consecutive messages read the same piece)."""
        key = (epoch, piece)
        if key not in self._orders:
            if len(self._orders) >= 4:
                del self._orders[next(iter(self._orders))]
            seeds = np.random.SeedSequence([*self.epoch_words, epoch]).generate_state(ROUNDS, np.uint64)
            permutation = KeyedPermutation(len(self.epoch_packs), seeds)
            first = piece * ORDER_PIECE
            self._orders[key] = permutation(np.arange(first, min(first + ORDER_PIECE, len(self.epoch_packs))))
        return self._orders[key]

    def read(self, rows: int) -> None:
        """``rows`` more rows were read: every :data:`RELEASE_EVERY_ROWS` drops this process's
        resident pages of a memory-mapped corpus and its tables, if larger than :data:`RELEASE_WINDOW_BYTES`."""
        self._rows_since_release += rows
        if self._rows_since_release >= RELEASE_EVERY_ROWS and self.releases_pages:
            self.corpus.release_pages()
            for table in self._tables:
                table.release()
            self._rows_since_release = 0
