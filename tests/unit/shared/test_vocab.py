"""Vocabulary and special ids (docs/SPEC.md §2.1)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.limits import MAX_VOCAB_SIZE
from shared.vocab import IGNORE_INDEX, SPECIAL_TOKENS, Vocabulary, VocabularyError

# Any character that UTF-8 / UTF-32 can carry (lone surrogates excluded), BMP and beyond.
text_chars = st.characters(blacklist_categories=("Cs",))


def test_from_text_is_sorted_distinct():
    vocabulary = Vocabulary.from_text("hello world\nhello")
    assert vocabulary.chars == "\n dehlorw"
    assert vocabulary.base_size == 9


@given(st.text(alphabet=text_chars, min_size=1, max_size=200))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_from_text_matches_python_set(text):
    vocabulary = Vocabulary.from_text(text)
    assert vocabulary.chars == "".join(sorted(set(text)))


def test_special_ids_follow_the_base_vocabulary():
    vocabulary = Vocabulary("abc")
    assert (vocabulary.mask_id, vocabulary.sep_id, vocabulary.pad_id) == (3, 4, 5)
    assert vocabulary.vocab_size == 6
    assert IGNORE_INDEX == -100
    assert SPECIAL_TOKENS == ("[MASK]", "[SEP]", "[PAD]")


@given(st.text(alphabet=text_chars, min_size=1, max_size=300))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_encode_decode_round_trip(text):
    vocabulary = Vocabulary.from_text(text)
    ids = vocabulary.encode(text)
    assert ids.dtype == np.uint16 and ids.shape == (len(text),)
    assert ids.max() < vocabulary.base_size
    assert [vocabulary.chars[i] for i in ids] == list(text)
    assert vocabulary.decode(ids) == text


def test_decode_writes_specials_by_name():
    vocabulary = Vocabulary("ab")
    assert vocabulary.decode([0, 2, 1, 3, 4]) == "a[MASK]b[SEP][PAD]"


@pytest.mark.parametrize("bad_id", [-1, IGNORE_INDEX, 5])
def test_decode_refuses_ids_outside_the_vocabulary(bad_id):
    with pytest.raises(VocabularyError):
        Vocabulary("ab").decode([0, bad_id])


def test_unknown_character_names_character_and_offset():
    vocabulary = Vocabulary.from_text("abc")
    with pytest.raises(VocabularyError) as error:
        vocabulary.encode("abcabZc")
    assert "'Z'" in str(error.value) and "offset 5" in str(error.value)


def test_unknown_character_beyond_the_last_base_char():
    with pytest.raises(VocabularyError, match="offset 1"):
        Vocabulary("ab").encode("a\U0001f600")


def test_non_bmp_characters():
    text = "a\U0001f600b\U00010348\n"
    vocabulary = Vocabulary.from_text(text)
    assert vocabulary.base_size == 5
    ids = vocabulary.encode(text)
    assert vocabulary.decode(ids) == text
    assert ids[1] == vocabulary.chars.index("\U0001f600")
    with pytest.raises(VocabularyError, match="offset 2"):
        vocabulary.encode("ab\U0001f601")


@pytest.mark.parametrize("chars", ["ba", "aa", ""])
def test_unsorted_duplicate_or_empty_vocabulary_refused(chars):
    with pytest.raises(VocabularyError):
        Vocabulary(chars)


def test_too_large_vocabulary_refused():
    limit = MAX_VOCAB_SIZE - len(SPECIAL_TOKENS)
    largest = "".join(chr(c) for c in range(0x4E00, 0x4E00 + limit))
    assert Vocabulary(largest).vocab_size == MAX_VOCAB_SIZE
    assert Vocabulary(largest).pad_id == np.iinfo(np.int16).max - 1
    with pytest.raises(VocabularyError, match="int16"):
        Vocabulary.from_text(largest + "a")
