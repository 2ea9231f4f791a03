"""``python -m producer record`` / ``inspect`` end to end, as subprocesses."""

import json
import os

import msgpack
import numpy as np
import pytest

from shared.recording import END_MARK, RECORD_MARK, RecordingReader
from shared.vocab import IGNORE_INDEX

from helpers import ROOT
from helpers.processes import run_module
from helpers.wire import recorded_batches

# The corpus of unit/producer/test_stream.py: unique lines of varied length.
END_MARK_BYTES = len(END_MARK) + 8
STREAM_TEXT = "".join(f"line {i} " + "abcdefg"[: i % 7] * (i % 5) + "\n" for i in range(300)) + "tail with Z\n"


def producer(*args, check=True, **environment):
    """``python -m producer ARGS``; ``environment`` is added to the child's."""
    result = run_module("producer", *args, env={**os.environ, "PYTHONPATH": str(ROOT), **environment})
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("".join(f"to be or not to be, line {i}\n" for i in range(400)))
    return path


def test_record_then_inspect_a_small_corpus(corpus, tmp_path):
    out = tmp_path / "s.lps"
    producer("record", "--corpus", corpus, "--out", out, "--messages", 30, "--policy", "uniform",
             "--block-size", 128, "--producer-id", "w3")
    with RecordingReader(out) as reader:
        messages = recorded_batches(reader)
    val = messages[0].meta.val_messages
    assert [m.seq for m in messages] == list(range(1, val + 31))  # seq 0 is the meta message
    # As a trainer orders them: the whole val set, then train messages k = 0 .. 29.
    assert [(m.split, m.index) for m in messages] == [("val", i) for i in range(val)] + [("train", k) for k in range(30)]
    assert {m.producer_id for m in messages} == {"w3"}
    report = json.loads(producer("inspect", out).stdout)
    assert report["splits"] == {"val": val, "train": 30} and report["rejected"] == 0
    assert report["rows"] == sum(m.rows for m in messages) and report["rows"] >= 30 * 16
    assert report["meta"]["block_size"] == 128 and report["meta"]["corruption"]["policy"] == "uniform"
    assert 0.85 < report["packing_efficiency"] <= 1 and report["valid_len"]["max"] <= 128
    assert 0.4 < report["supervised_per_token"] < 0.6
    assert abs(report["pct_mask"] - 80) < 3 and abs(report["pct_random"] - 10) < 3 and abs(report["pct_unchanged"] - 10) < 3
    assert report["mask_ratio"]["p10"] < report["mask_ratio"]["p50"] < report["mask_ratio"]["p90"]
    assert not report["truncated"] and report["lost_bytes"] == 0 and report["corrupt_records"] == 0


def test_record_then_inspect_span_masking(corpus, tmp_path):
    """A policy added in shared/corruption.py alone has its flags, its recording and its report."""
    out = tmp_path / "span.lps"
    producer("record", "--corpus", corpus, "--out", out, "--messages", 20, "--policy", "span", "--span-ratio", "0.25",
             "--span-mean", "4", "--block-size", 128)
    report = json.loads(producer("inspect", out).stdout)
    assert report["rejected"] == 0 and report["splits"]["train"] == 20
    assert report["meta"]["corruption"]["policy"] == "span" and report["meta"]["corruption"]["span_mean"] == 4.0
    assert report["mask_ratio"]["p10"] > 0.23 and report["mask_ratio"]["p90"] < 0.27  # round(0.25 n) / n per row
    with RecordingReader(out) as reader:
        messages = [m for m in recorded_batches(reader) if m.split == "train"]
    supervised = np.concatenate([m.tensors["y"] != IGNORE_INDEX for m in messages])
    starts = np.count_nonzero(np.diff(supervised.astype(np.int8), axis=1) == 1)
    assert 3 < supervised.sum() / starts < 5  # runs of about the mean span length (the first of a row may start at 0)


def test_val_recording_cycles_the_val_set_with_indices(corpus, tmp_path):
    out = tmp_path / "v.lps"
    producer("record", "--corpus", corpus, "--out", out, "--messages", 7, "--split", "val",
             "--block-size", 128, "--rows-per-message", 2, "--policy", "stages")
    with RecordingReader(out) as reader:
        messages = recorded_batches(reader)
    val_messages = messages[0].meta.val_messages
    assert val_messages == 5  # 40 val lines of about 29 tokens: 4 per row, 10 rows, 2 per message
    assert [m.val_index for m in messages] == [0, 1, 2, 3, 4, 0, 1]
    assert [m.seq for m in messages] == list(range(1, 8)) and {m.split for m in messages} == {"val"}
    assert all("stage" in m.tensors for m in messages)
    assert bytes(messages[0].frames[1]) == bytes(messages[5].frames[1])


def test_inspect_reports_a_cut_recording_and_a_corrupt_record(corpus, tmp_path):
    out = tmp_path / "cut.lps"
    producer("record", "--corpus", corpus, "--out", out, "--messages", 4, "--block-size", 64)
    data = bytearray(out.read_bytes()[:-END_MARK_BYTES])  # no end mark: the recorder was killed
    data[-100] ^= 0xFF  # inside the last record: its body CRC fails
    second_record = data.index(RECORD_MARK, data.index(RECORD_MARK) + 1)
    out.write_bytes(bytes(data) + data[second_record : second_record + 50])  # and a cut record after it
    report = json.loads(producer("inspect", out).stdout)
    assert report["splits"]["train"] == 3 and report["corrupt_records"] == 1
    assert report["truncated"] and report["lost_bytes"] == 50 and "cut short" in report["problem"]


def test_prepare_record_inspect_with_a_trained_bpe(tmp_path):
    """The must-show pipeline in small: tokenizer train, prepare, record, inspect (vocab V0 + 3, 80/10/10)."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Now is the winter {i} of our discontent, made glorious summer\n" for i in range(3000)))
    producer("tokenizer", "train", "--corpus", text, "--vocab-size", 400, "--out", tmp_path / "tok.json")
    producer("prepare", "--corpus", text, "--tokenizer", tmp_path / "tok.json", "--workers", 1, "--out", tmp_path / "P")
    out = tmp_path / "s.lps"
    producer("record", "--corpus", tmp_path / "P", "--out", out, "--messages", 20, "--block-size", 128)
    report = json.loads(producer("inspect", out).stdout)
    assert report["meta"]["tokenizer"] == "hf" and report["meta"]["vocab_size"] == 403
    assert report["splits"]["train"] == 20 and report["rejected"] == 0 and report["packing_efficiency"] > 0.8
    assert abs(report["pct_mask"] - 80) < 3 and abs(report["pct_random"] - 10) < 3 and abs(report["pct_unchanged"] - 10) < 3
    with RecordingReader(out) as reader:
        messages = recorded_batches(reader)
    tokenizer = messages[0].meta.tokens
    for message in messages[:5]:
        x, y = message.tensors["x"], message.tensors["y"]
        original = np.where(y != IGNORE_INDEX, y, x)
        for row, valid in zip(original, message.valid_len):
            assert row[valid - 1] == tokenizer.sep_id
            rebuilt = tokenizer.decode(row[: valid - 1])
            assert rebuilt.endswith("\n") and all(line.startswith("Now is the winter ") for line in rebuilt.splitlines())


def test_record_on_the_builtin_corpus(tmp_path):
    out = tmp_path / "b.lps"
    producer("record", "--out", out, "--messages", 3, "--block-size", 256, "--packing", "fixed")
    report = json.loads(producer("inspect", out).stdout)
    assert report["splits"]["train"] == 3 and report["packing_efficiency"] == 1.0
    assert report["meta"]["packing"] == "fixed"
    assert abs(report["supervised_per_token"] - 0.15) < 0.05


def test_record_reads_jsonl_by_its_text_field_as_prepare_does(tmp_path):
    documents = [f"document {i} of a small jsonl corpus" for i in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    (tmp_path / "d.txt").write_text("".join(document + "\n" for document in documents))
    metas = []
    for corpus, flags in (("d.jsonl", ["--text-field", "text"]), ("d.txt", [])):
        producer("record", "--corpus", tmp_path / corpus, *flags, "--out", tmp_path / f"{corpus}.lps", "--messages", 3)
        metas.append(json.loads(producer("inspect", tmp_path / f"{corpus}.lps").stdout)["meta"])
    assert metas[0]["corpus_fingerprint"] == metas[1]["corpus_fingerprint"], "the documents' text, not the JSON around it"
    assert metas[0]["base_size"] == metas[1]["base_size"]


def test_usage_errors(tmp_path):
    missing = producer("record", "--corpus", tmp_path / "nope.txt", "--out", tmp_path / "x.lps", "--messages", 1, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = producer("record", "--out", tmp_path / "x.lps", "--messages", 1, "--mask-fractions", "1,1,1", check=False)
    assert bad.returncode == 2 and "--mask-fractions" in bad.stderr
    (tmp_path / "d.jsonl").write_text('{"text": "a document"}\n')  # read as prepare reads it, never as plain text
    jsonl = producer("record", "--corpus", tmp_path / "d.jsonl", "--out", tmp_path / "x.lps", "--messages", 1, check=False)
    assert jsonl.returncode == 2 and "name the field that holds the text with --text-field" in jsonl.stderr
    (tmp_path / "junk.lps").write_bytes(b"not a recording")
    junk = producer("inspect", tmp_path / "junk.lps", check=False)
    assert junk.returncode == 2 and "not a Linepack recording" in junk.stderr


def test_the_stream_does_not_depend_on_pythons_hash_seed(tmp_path):
    corpus_path = tmp_path / "corpus.txt"
    corpus_path.write_text(STREAM_TEXT)
    recorded = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"s{hash_seed}.lps"
        producer("record", "--corpus", corpus_path, "--block-size", "64", "--rows-per-message", "8", "--policy", "uniform",
                 "--producer-id", "not-the-default", "--messages", "3", "--out", out, PYTHONHASHSEED=hash_seed)
        with RecordingReader(out) as reader:
            frames = list(reader)
        headers = [msgpack.unpackb(record[0]) for record in frames]
        assert len({header.pop("incarnation") for header in headers}) == 1  # one per run, random
        recorded.append((headers, [record[1:] for record in frames]))
    assert len(recorded[0][0]) > 4 and recorded[0] == recorded[1]  # the meta message, the val set and 3 batches
