"""Line-aligned and fixed packing (docs/SPEC.md §2.3, §2.4) on random corpora and block sizes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.lines import Lines
from producer.packing import FixedPacker, LinePacker, content_ends, pack_pieces

NEWLINE, SEP, PAD = 0, 6, 7  # base ids 0..4 ([MASK] = 5 is unused by packing)


@st.composite
def corpora(draw):
    """Random lines (lengths 0..40 plus the newline) of base ids 1..4, and a block size."""
    lengths = draw(st.lists(st.integers(0, 40), min_size=1, max_size=60))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pieces = [np.append(rng.integers(1, 5, n), NEWLINE) for n in lengths]
    tokens = np.concatenate(pieces).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return Lines(tokens, starts), draw(st.integers(2, 64)), seed


def reference_row(lines: Lines, line: int, block_size: int) -> list[int]:
    """The row starting at ``line``, built line by line: the definition of docs/SPEC.md §2.3."""
    content = []
    for i in range(line, lines.n_lines):
        piece = lines.tokens[lines.starts[i] : lines.starts[i + 1]].tolist()
        if len(content) + len(piece) > block_size - 1:
            if i == line:
                content = piece[: block_size - 1]
            break
        content += piece
    return content + [SEP] + [PAD] * (block_size - 1 - len(content))


@settings(max_examples=150, deadline=None)
@given(corpora())
def test_line_rows_match_the_definition_and_every_invariant(case):
    lines, block_size, seed = case
    packer = LinePacker(lines, block_size, SEP, PAD)
    start_lines = packer.random_starts(np.random.default_rng(seed), 32)
    packed = packer.pack(start_lines)
    x, mask, content_len = packed.x, packed.attention_mask, packed.content_len
    assert x.dtype == np.uint16 and mask.dtype == np.uint8 and x.shape == mask.shape == (32, block_size)
    valid_len = content_len + 1
    line_ends = set(lines.starts[1:].tolist())
    for row, line in enumerate(start_lines):
        assert x[row].tolist() == reference_row(lines, line, block_size)
        first = lines.starts[line]
        end = first + content_len[row]
        # Starts at a line start; holds whole lines except a truncated overlong first line.
        first_line_length = lines.starts[line + 1] - first
        truncated = first_line_length > block_size - 1
        if truncated:
            assert content_len[row] == block_size - 1
        else:
            assert end in line_ends
            # Greedy: the next line would not have fitted.
            if end < len(lines.tokens):
                next_line = np.searchsorted(lines.starts, end)
                assert content_len[row] + lines.starts[next_line + 1] - end > block_size - 1
        assert (x[row, : content_len[row]] == lines.tokens[first:end]).all()
    positions = np.arange(block_size)
    assert (x[np.arange(32), valid_len - 1] == SEP).all()
    assert ((x == SEP) == (positions == (valid_len - 1)[:, None])).all()
    assert ((x == PAD) == (positions >= valid_len[:, None])).all()
    assert (mask == (positions < valid_len[:, None])).all()


@settings(max_examples=100, deadline=None)
@given(corpora())
def test_greedy_packs_cover_every_line_exactly_once(case):
    lines, block_size, _ = case
    packer = LinePacker(lines, block_size, SEP, PAD)
    starts = packer.greedy_starts()
    assert starts[0] == 0 and (np.diff(starts) > 0).all()
    end = content_ends(lines.starts, block_size, starts)
    first_line_end = lines.starts[starts + 1]
    # A pack ends where the next begins, or inside its own first (overlong, truncated) line.
    next_start = np.append(lines.starts[starts[1:]], len(lines.tokens))
    assert ((end == next_start) | ((end < first_line_end) & (first_line_end == next_start))).all()
    packed = packer.pack(starts)
    for row, line in enumerate(starts):
        assert packed.x[row].tolist() == reference_row(lines, line, block_size)
    assert packer.greedy_starts(max_rows=2).tolist() == starts[:2].tolist()


@settings(max_examples=100, deadline=None)
@given(corpora())
def test_fixed_rows_are_consecutive_tokens_with_full_attention(case):
    lines, block_size, seed = case
    packer = FixedPacker(lines, block_size)
    offsets = packer.random_starts(np.random.default_rng(seed), 16)
    n_tokens = len(lines.tokens)
    assert (offsets <= max(n_tokens - block_size, 0)).all()
    packed = packer.pack(offsets)
    expected = lines.tokens[(offsets[:, None] + np.arange(block_size)) % n_tokens]
    assert (packed.x == expected).all()
    assert (packed.attention_mask == 1).all() and (packed.content_len == block_size).all()
    greedy = packer.greedy_starts()
    assert greedy.tolist() == list(range(0, n_tokens, block_size))


def test_truncated_first_line_and_end_of_split():
    lines = Lines(np.array([1, 2, 3, 4, 0, 1, 0], np.uint16), np.array([0, 5, 7]))
    packer = LinePacker(lines, 4, SEP, PAD)
    packed = packer.pack(np.array([0, 1]))
    assert packed.x.tolist() == [[1, 2, 3, SEP], [1, 0, SEP, PAD]]
    assert packed.content_len.tolist() == [3, 2]
    assert packer.greedy_starts().tolist() == [0, 1]


@settings(max_examples=200, deadline=None)
@given(corpora(), st.integers(1, 8))
def test_the_row_length_table_is_the_definition_at_every_start_line_in_any_piece_size(case, piece_lines):
    """Locating a row reads its length from the table (``LinePacker.lengths``, built
    ``piece_lines`` lines at a time here): the content of the row the definition builds line by
    line, at every start line; the greedy packs are the same whatever the piece size."""
    lines, block_size, _ = case
    whole = LinePacker(lines, block_size, SEP, PAD)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("producer.packing.GREEDY_CHUNK_LINES", piece_lines)
        packer = LinePacker(lines, block_size, SEP, PAD)
        assert np.array_equal(packer.greedy_starts(), whole.greedy_starts())
    expected = [reference_row(lines, line, block_size).index(SEP) for line in range(lines.n_lines)]
    assert packer.lengths.dtype == np.uint16 and packer.lengths.tolist() == expected
    first, content_len = packer.locate(np.arange(lines.n_lines, dtype=np.int64))
    assert np.array_equal(first, lines.starts[:-1]) and content_len.tolist() == expected and content_len.dtype == np.int64


def test_row_lengths_fit_uint16_at_the_largest_block():
    """At block 65536 a row holds at most 65535 content tokens: an overlong line is cut there."""
    lengths = [70_000, 65_535, 65_534, 1, 3]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    packer = LinePacker(Lines(np.ones(starts[-1], np.uint16), starts), 65_536, SEP, PAD)
    assert packer.lengths.tolist() == [65_535, 65_535, 65_535, 4, 3]


@settings(max_examples=100, deadline=None)
@given(corpora(), corpora(), st.integers(0, 2**32 - 1), st.booleans())
def test_rows_of_several_corpora_packed_at_once_are_each_corpus_own_rows_in_place(one, other, seed, fixed):
    """A mixture's message (:func:`pack_pieces`): row for row what each corpus's own packer gives."""
    block_size = one[1]
    packers = [FixedPacker(lines, block_size) if fixed else LinePacker(lines, block_size, SEP, PAD)
               for lines in (one[0], other[0])]
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 2, 24)
    pieces = [(packer, packer.random_starts(rng, int((source == s).sum())), np.flatnonzero(source == s))
              for s, packer in enumerate(packers)]
    packed = pack_pieces(pieces, len(source))
    for packer, starts, places in pieces:
        alone = packer.pack(starts)
        assert np.array_equal(packed.x[places], alone.x) and np.array_equal(packed.content_len[places], alone.content_len)
        assert np.array_equal(packed.attention_mask[places], alone.attention_mask)
    assert packed.x.dtype == np.uint16 and packed.attention_mask.dtype == np.uint8
