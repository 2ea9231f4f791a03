"""Corpus loading (built-in, file, folder), its errors, and the train/val line split."""

import hashlib

import numpy as np
import pytest

from producer.corpus import BUILTIN_NAME, CorpusError, load_corpus, split_lines
from shared.vocab import Vocabulary


def test_builtin_corpus_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    corpus = load_corpus(None)
    assert corpus.name == BUILTIN_NAME
    assert corpus.text == "".join(topics[key] for key in sorted(topics))
    assert corpus.fingerprint == hashlib.sha256(corpus.text.encode()).hexdigest()[:16]
    assert len(corpus.text) > 100_000


def test_file_gets_a_final_newline(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\nworld", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.text == "héllo\nworld\n"
    assert corpus.name == str(path)
    assert corpus.fingerprint == hashlib.sha256("héllo\nworld\n".encode()).hexdigest()[:16]


def test_folder_concatenates_sorted_txt_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "c.md").write_text("ignored")
    (tmp_path / "d.txt").write_text("")
    assert load_corpus(str(tmp_path)).text == "first\nsecond\n"


def _write(path, text):
    path.write_text(text)
    return path


UNUSABLE = {
    "missing path": (lambda d: d / "missing.txt", "does not exist"),
    "empty file": (lambda d: _write(d / "e.txt", ""), "empty"),
    "line breaks only": (lambda d: _write(d / "n.txt", "\n\n"), "empty"),
    "folder without .txt": (lambda d: _write(d / "x.md", "text").parent, "no .txt files"),
    "folder of empty files": (lambda d: _write(d / "e.txt", "").parent, "empty"),
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_unusable_corpora_raise_corpus_error(tmp_path, case):
    make_path, message = UNUSABLE[case]
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(make_path(tmp_path)))


def test_undecodable_bytes_name_the_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(CorpusError) as info:
        load_corpus(str(tmp_path))
    assert "bad.txt" in str(info.value) and "byte offset 14" in str(info.value) and "0xff" in str(info.value)
    assert isinstance(info.value, ValueError)


def _lines(n):
    text = "".join(f"line {i}\n" for i in range(n))
    vocabulary = Vocabulary.from_text(text)
    return vocabulary, vocabulary.encode(text)


def test_split_is_by_lines_first_ninety_percent_train():
    vocabulary, tokens = _lines(20)
    newline = int(vocabulary.encode("\n")[0])
    train, val = split_lines(tokens, newline, 0.1)
    assert (train.n_lines, val.n_lines) == (18, 2)
    assert vocabulary.decode(train.tokens) == "".join(f"line {i}\n" for i in range(18))
    assert vocabulary.decode(val.tokens) == "line 18\nline 19\n"
    for part in (train, val):
        assert part.starts[0] == 0 and part.starts[-1] == len(part.tokens)
        ends = part.starts[1:] - 1
        assert (part.tokens[ends] == newline).all()
        assert np.count_nonzero(part.tokens == newline) == part.n_lines


def test_split_keeps_a_line_on_each_side_and_zero_means_no_val():
    vocabulary, tokens = _lines(3)
    newline = int(vocabulary.encode("\n")[0])
    assert split_lines(tokens, newline, 0.01)[1].n_lines == 1
    assert split_lines(tokens, newline, 0.99)[0].n_lines == 1
    train, val = split_lines(tokens, newline, 0.0)
    assert val is None and train.n_lines == 3
    one_vocabulary, one_line = _lines(1)
    with pytest.raises(CorpusError, match="at least 2"):
        split_lines(one_line, int(one_vocabulary.encode("\n")[0]), 0.1)
