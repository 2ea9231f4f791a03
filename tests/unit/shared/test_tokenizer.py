"""Tokenizers and the id layout (docs/SPEC.md §2.1): characters, UTF-8 bytes, Hugging Face files.

Every tokenizer encodes whole lines and says how many ids each line took, so packing stays
line-aligned whatever the tokenizer; the specials come after the base ids; dtypes are the
smallest that hold the vocabulary.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.limits import MAX_VOCAB_SIZE
from shared.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_definition
from shared.vocab import IGNORE_INDEX, SPECIAL_TOKENS, SpecialIds, VocabularyError, id_dtype, label_dtype

# Any character that UTF-8 / UTF-32 can carry (lone surrogates excluded), BMP and beyond.
text_chars = st.characters(blacklist_categories=("Cs",))
lines_text = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30),
                      min_size=1, max_size=20).map(lambda lines: "".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """A small byte-level BPE with a [CLS] special token of its own, trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["[CLS]"],
                                  show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat\n", "a dog, the end\n"] * 50, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    backend.save(str(path))
    return path


def test_char_vocabulary_is_sorted_distinct():
    vocabulary = CharTokenizer.from_text("hello world\nhello")
    assert vocabulary.chars == "\n dehlorw" and vocabulary.base_size == 9


@given(st.text(alphabet=text_chars, min_size=1, max_size=200))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_char_vocabulary_matches_python_set(text):
    assert CharTokenizer.from_text(text).chars == "".join(sorted(set(text)))


def test_special_ids_follow_the_base_vocabulary():
    for tokenizer in (CharTokenizer("abc"), ByteTokenizer()):
        base = tokenizer.base_size
        assert (tokenizer.mask_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.vocab_size) == (base, base + 1, base + 2, base + 3)
    assert ByteTokenizer().base_size == 256
    assert IGNORE_INDEX == -100 and SPECIAL_TOKENS == ("[MASK]", "[SEP]", "[PAD]")


@given(st.text(alphabet=text_chars, min_size=1, max_size=300))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_char_encode_decode_round_trip(text):
    vocabulary = CharTokenizer.from_text(text)
    ids = vocabulary.encode(text)
    assert ids.shape == (len(text),) and ids.max() < vocabulary.base_size
    assert [vocabulary.chars[i] for i in ids] == list(text)
    assert vocabulary.decode(ids) == text


@given(lines_text)
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
def test_every_tokenizer_encodes_line_by_line(text):
    """encode_text of whole lines = each line encoded on its own, concatenated, with its length."""
    lines = [line + "\n" for line in text.split("\n")[:-1]]
    for tokenizer in (CharTokenizer.from_text(text), ByteTokenizer()):
        ids, lengths = tokenizer.encode_text(text)
        assert len(lengths) == len(lines) and int(lengths.sum()) == len(ids)
        pieces = [tokenizer.encode_text(line)[0] for line in lines]
        assert np.array_equal(ids, np.concatenate(pieces))
        assert [int(n) for n in lengths] == [len(piece) for piece in pieces]
        assert tokenizer.decode(ids) == text


def test_text_must_be_whole_lines():
    for tokenizer in (CharTokenizer("\nab"), ByteTokenizer()):
        with pytest.raises(VocabularyError, match="whole lines"):
            tokenizer.encode_text("ab\nab")


def test_decode_writes_specials_by_name():
    assert CharTokenizer("ab").decode([0, 2, 1, 3, 4]) == "a[MASK]b[SEP][PAD]"
    assert ByteTokenizer().decode([104, 105, 256, 257]) == "hi[MASK][SEP]"


@pytest.mark.parametrize("bad_id", [-1, IGNORE_INDEX, 5])
def test_decode_refuses_ids_outside_the_vocabulary(bad_id):
    with pytest.raises(VocabularyError):
        CharTokenizer("ab").decode([0, bad_id])


def test_unknown_character_names_character_and_offset():
    vocabulary = CharTokenizer.from_text("abc")
    with pytest.raises(VocabularyError) as error:
        vocabulary.encode("abcabZc")
    assert "'Z'" in str(error.value) and "offset 5" in str(error.value)
    with pytest.raises(VocabularyError, match="offset 1"):
        CharTokenizer("ab").encode("a\U0001f600")


def test_non_bmp_characters():
    text = "a\U0001f600b\U00010348\n"
    vocabulary = CharTokenizer.from_text(text)
    assert vocabulary.base_size == 5
    ids = vocabulary.encode(text)
    assert vocabulary.decode(ids) == text and ids[1] == vocabulary.chars.index("\U0001f600")
    assert ByteTokenizer().decode(ByteTokenizer().encode_text(text)[0]) == text


@pytest.mark.parametrize("chars", ["ba", "aa", ""])
def test_unsorted_duplicate_or_empty_vocabulary_refused(chars):
    with pytest.raises(VocabularyError):
        CharTokenizer(chars)


def test_the_smallest_dtypes_hold_the_vocabulary():
    assert (id_dtype(259), label_dtype(259)) == (np.dtype("<u2"), np.dtype("<i2"))
    assert (id_dtype(32768), label_dtype(32768)) == (np.dtype("<u2"), np.dtype("<i2"))  # ids 0..32767
    assert (id_dtype(32769), label_dtype(32769)) == (np.dtype("<u2"), np.dtype("<i4"))
    assert (id_dtype(65536), id_dtype(65537)) == (np.dtype("<u2"), np.dtype("<u4"))


def test_a_vocabulary_too_large_for_the_wire_is_refused():
    assert SpecialIds(MAX_VOCAB_SIZE - 3).vocab_size == MAX_VOCAB_SIZE
    with pytest.raises(VocabularyError, match="do not fit the wire"):
        SpecialIds(MAX_VOCAB_SIZE - 2)
    wide = "".join(chr(c) for c in range(0x20000, 0x20000 + 40_000))  # more than uint16 labels hold
    assert label_dtype(CharTokenizer(wide).vocab_size) == np.dtype("<i4")


def test_hf_tokenizer_lines_specials_and_round_trip(bpe_file):
    tokenizer = HFTokenizer.from_file(bpe_file)
    assert tokenizer.base_size == tokenizer.backend.get_vocab_size(with_added_tokens=True) > 256
    text = "the cat sat\n[CLS] on the mat\n"
    ids, lengths = tokenizer.encode_text(text)
    assert len(lengths) == 2 and int(lengths.sum()) == len(ids)
    cls_id = tokenizer.backend.token_to_id("[CLS]")
    assert cls_id not in ids.tolist(), "the tokenizer's own special token came from corpus text"
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([*ids[: lengths[0]].tolist(), tokenizer.sep_id]) == "the cat sat\n[SEP]"
    rebuilt = tokenizer_from_definition("hf", tokenizer.definition)
    assert rebuilt.digest == tokenizer.digest and np.array_equal(rebuilt.encode_text(text)[0], ids)


def test_a_file_that_is_no_tokenizer_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"not": "a tokenizer"}')
    with pytest.raises(VocabularyError, match="not a tokenizers file"):
        HFTokenizer.from_file(broken)
    with pytest.raises(VocabularyError, match="cannot read"):
        load_tokenizer(str(tmp_path / "missing.json"))
