"""Corpus loading (built-in, file, folder), its errors, and the train/val line split."""

import hashlib

import numpy as np
import pytest

from producer.corpus import BUILTIN_NAME, Corpus, CorpusError, load_corpus, read_text, tokenize


def test_builtin_corpus_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    corpus = read_text(None)
    assert corpus.name == BUILTIN_NAME
    assert corpus.text == "".join(topics[key] for key in sorted(topics))
    assert corpus.fingerprint == hashlib.sha256(corpus.text.encode()).hexdigest()[:16]
    assert len(corpus.text) > 100_000


def test_file_gets_a_final_newline(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\nworld", encoding="utf-8")
    corpus = read_text(str(path))
    assert corpus.text == "héllo\nworld\n"
    assert corpus.name == str(path)
    assert corpus.fingerprint == hashlib.sha256("héllo\nworld\n".encode()).hexdigest()[:16]


def test_folder_concatenates_sorted_txt_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "c.md").write_text("ignored")
    (tmp_path / "d.txt").write_text("")
    assert read_text(str(tmp_path)).text == "first\nsecond\n"


def _write(path, text):
    path.write_text(text)
    return path


UNUSABLE = {
    "missing path": (lambda d: d / "missing.txt", "does not exist"),
    "empty file": (lambda d: _write(d / "e.txt", ""), "empty"),
    "line breaks only": (lambda d: _write(d / "n.txt", "\n\n"), "empty"),
    "folder without .txt": (lambda d: _write(d / "x.md", "text").parent, r"holds no text \(.txt\)"),
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


def test_text_corpora_are_read_as_prepare_reads_them(tmp_path):
    """.jsonl by its --text-field (never as plain text with JSON braces), folders recursively, .gz."""
    import gzip

    from producer.prepare import PrepareSettings, prepare

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.jsonl").write_text('{"text": "first doc"}\n{"text": "second\\ndoc"}\n')
    (tmp_path / "src" / "sub" / "b.txt.gz").write_bytes(gzip.compress(b"plain line"))
    corpus = str(tmp_path / "src")
    assert read_text(corpus, "text").text == "first doc\nsecond\ndoc\nplain line\n"
    with pytest.raises(CorpusError, match="name the field that holds the text with --text-field"):
        load_corpus(str(tmp_path / "src" / "a.jsonl"))
    in_memory = load_corpus(corpus, "bytes", 0.25, text_field="text")
    prepare(PrepareSettings(corpus=corpus, out=str(tmp_path / "P"), tokenizer="bytes", val_fraction=0.25, workers=1,
                            text_field="text"))
    prepared = load_corpus(str(tmp_path / "P"))
    assert np.array_equal(np.asarray(prepared.tokens), in_memory.tokens)
    assert np.array_equal(np.asarray(prepared.offsets), in_memory.offsets)
    assert prepared.split_line == in_memory.split_line


def _corpus(n, val_fraction=0.1, tokenizer="char"):
    text = "".join(f"line {i}\n" for i in range(n))
    return tokenize(Corpus(text, "t", "0" * 16), tokenizer, val_fraction)


@pytest.mark.parametrize("tokenizer", ["char", "bytes"])
def test_split_is_by_lines_first_ninety_percent_train(tokenizer):
    corpus = _corpus(20, tokenizer=tokenizer)
    train, val = corpus.train_lines(), corpus.val_lines()
    assert (train.n_lines, val.n_lines) == (18, 2)
    decode = corpus.tokenizer.decode
    assert decode(train.tokens) == "".join(f"line {i}\n" for i in range(18))
    assert decode(val.tokens) == "line 18\nline 19\n"
    newline = int(corpus.tokenizer.encode_text("\n")[0][0])
    for part in (train, val):
        assert part.starts[0] == 0 and part.starts[-1] == len(part.tokens)
        assert (part.tokens[part.starts[1:] - 1] == newline).all()
        assert np.count_nonzero(part.tokens == newline) == part.n_lines
    assert corpus.train_counts.sum() == len(train.tokens)
    assert corpus.train_counts[newline] == 18


def test_split_keeps_a_line_on_each_side_and_zero_means_no_val():
    assert _corpus(3, 0.01).val_lines().n_lines == 1
    assert _corpus(3, 0.99).train_lines().n_lines == 1
    whole = _corpus(3, 0.0)
    assert whole.val_lines() is None and whole.train_lines().n_lines == 3
    with pytest.raises(CorpusError, match="at least 2"):
        _corpus(1, 0.1)


def test_load_corpus_defaults_to_chars_and_a_tenth_for_val(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"l{i}\n" for i in range(10)))
    corpus = load_corpus(str(path))
    assert corpus.tokenizer.kind == "char" and corpus.val_lines().n_lines == 1
    assert load_corpus(str(path), "bytes", 0.2).val_lines().n_lines == 2


def test_an_unusable_tokenizer_file_is_a_corpus_error(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello\n")
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    with pytest.raises((CorpusError, ValueError), match="tok.json"):
        load_corpus(str(path), str(bad))
