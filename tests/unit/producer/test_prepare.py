"""``producer prepare`` and the prepared folder (docs/SPEC.md §2.7): the same ids and lines as
tokenizing in memory, for every tokenizer and source kind; memory-mapped reading; the manifest
and its checks; an interrupted prepare leaves nothing that looks complete; every bad input is a
clear error and leaves nothing behind."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from producer import prepare as prepare_module
from producer import prepared
from producer.corpus import Corpus, load_corpus, tokenize
from producer.lines import CorpusError
from producer.prepare import PrepareSettings, prepare
from producer.source_rows import RELEASE_WINDOW_BYTES
from shared.tokenizer import HFTokenizer

from helpers import ROOT

TEXT = "".join(f"line {i}: " + "héllo wörld " * (i % 4) + "\n" for i in range(400))


def options(corpus, out, **overrides) -> PrepareSettings:
    return PrepareSettings(**{"corpus": str(corpus), "out": str(out), "workers": 1, "chunk_mb": 0.001, **overrides})


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".partial-" in name)


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["[CLS]"], show_progress=False))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    backend.save(str(path))
    return path


@pytest.mark.parametrize("kind", ["char", "bytes", "bpe"])
def test_prepared_ids_and_lines_are_the_in_memory_ones(tmp_path, kind, bpe_file):
    """Many small chunks through a worker process give exactly what tokenizing in memory gives."""
    spec = str(bpe_file) if kind == "bpe" else kind
    corpus = write(tmp_path / "c.txt", TEXT)
    manifest = prepare(options(corpus, tmp_path / "P", tokenizer=spec))
    mapped = load_corpus(str(tmp_path / "P"))
    memory = tokenize(Corpus(TEXT, "c", "0" * 16), spec, 0.1)
    assert mapped.tokenizer.digest == memory.tokenizer.digest and mapped.tokenizer.kind == memory.tokenizer.kind
    assert np.array_equal(mapped.tokens, memory.tokens) and mapped.tokens.dtype == np.uint16
    assert np.array_equal(mapped.offsets, memory.offsets) and mapped.split_line == memory.split_line == 360
    assert np.array_equal(mapped.train_counts, memory.train_counts)
    assert isinstance(mapped.tokens.base, (memoryview, type(None))) or not mapped.tokens.flags.owndata
    assert not mapped.tokens.flags.writeable, "the ids are a read-only map of the file"
    assert mapped.tokenizer.decode(mapped.tokens) == TEXT
    assert manifest["lines"] == 400 and manifest["tokens"] == len(memory.tokens)
    assert manifest["vocab_size"] == memory.tokenizer.vocab_size and manifest["fingerprint"] == mapped.fingerprint
    assert manifest["split"] == {"val_fraction": 0.1, "split_line": 360, "train_lines": 360, "val_lines": 40,
                                 "train_tokens": int(memory.offsets[360])}
    assert sorted(os.listdir(tmp_path / "P")) == sorted(
        ["manifest.json", "tokens.npy", "line_offsets.npy"] + (["tokenizer.json"] if kind == "bpe" else []))
    assert np.array_equal(np.load(tmp_path / "P" / "tokens.npy", mmap_mode="r"), memory.tokens), "plain .npy files"
    assert leftovers(tmp_path) == []


def test_folders_jsonl_and_gzip_are_read_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    write(root / "b" / "two.txt", "second file\nno final break")
    write(root / "a.txt", "first file\n")
    with gzip.open(root / "c.txt.gz", "wt", encoding="utf-8") as file:
        file.write("zipped\n")
    documents = [{"text": "doc one\nhas two lines"}, {"text": ""}, {"text": "doc two\n", "id": 2}]
    write(root / "d.jsonl", "\n".join(json.dumps(d) for d in documents) + "\n\n")
    with gzip.open(root / "e.jsonl.gz", "wt", encoding="utf-8") as file:
        file.write(json.dumps({"text": "zipped doc"}) + "\n")
    write(root / "ignored.md", "not a corpus file\n")
    manifest = prepare(options(root, tmp_path / "P", tokenizer="bytes", text_field="text", val_fraction=0.0))
    corpus = load_corpus(str(tmp_path / "P"))
    text = "first file\nsecond file\nno final break\nzipped\ndoc one\nhas two lines\ndoc two\nzipped doc\n"
    assert corpus.tokenizer.decode(corpus.tokens) == text
    assert corpus.n_lines == 8 and corpus.val_lines() is None
    assert [os.path.basename(s["path"]) for s in manifest["sources"]] == ["a.txt", "two.txt", "c.txt.gz", "d.jsonl",
                                                                          "e.jsonl.gz"]
    assert all(s["bytes"] == os.path.getsize(s["path"]) for s in manifest["sources"])
    without_field = prepare(options(root, tmp_path / "Q", tokenizer="bytes", val_fraction=0.0))
    assert len(without_field["sources"]) == 3, ".jsonl files are read only with --text-field"


def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path):
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 72_048) if not 0xD800 <= c < 0xE000)
    assert len(chars) == 70_000
    text = "".join(chars[i : i + 100] + "\n" for i in range(0, len(chars), 100))
    prepare(options(write(tmp_path / "c.txt", text), tmp_path / "P", chunk_mb=0.05))
    corpus = load_corpus(str(tmp_path / "P"))
    assert corpus.tokenizer.vocab_size == 70_004 and corpus.tokens.dtype == np.uint32  # and "\n"
    assert int(corpus.tokens.max()) == 70_000 and corpus.tokenizer.decode(corpus.tokens[:5]) == chars[:5]


def test_a_prepared_folder_fixes_its_tokenizer_and_split(tmp_path, bpe_file):
    prepare(options(write(tmp_path / "c.txt", TEXT), tmp_path / "P", tokenizer="bytes"))
    assert load_corpus(str(tmp_path / "P"), "bytes", 0.1).tokenizer.kind == "bytes"
    with pytest.raises(CorpusError, match="prepared with the bytes tokenizer"):
        load_corpus(str(tmp_path / "P"), "char")
    with pytest.raises(CorpusError, match="prepared with the bytes tokenizer"):
        load_corpus(str(tmp_path / "P"), str(bpe_file))
    with pytest.raises(CorpusError, match="--val-fraction 0.1, not 0.2"):
        load_corpus(str(tmp_path / "P"), None, 0.2)


def test_a_changed_or_damaged_folder_is_refused(tmp_path):
    prepare(options(write(tmp_path / "c.txt", TEXT), tmp_path / "P"))
    folder = tmp_path / "P"
    manifest_path = folder / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["lines"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="fingerprint"):
        load_corpus(str(folder))
    manifest_path.write_text(original)
    with open(folder / "tokens.npy", "ab") as file:
        file.write(b"\0\0")
    with pytest.raises(CorpusError, match="wrong size"):
        load_corpus(str(folder))
    manifest_path.write_text("{not json")
    with pytest.raises(CorpusError, match="unreadable manifest.json"):
        load_corpus(str(folder))


def test_the_fingerprint_names_the_preparation(tmp_path):
    corpus = write(tmp_path / "c.txt", TEXT)
    first = prepare(options(corpus, tmp_path / "P"))
    again = prepare(options(corpus, tmp_path / "Q"))
    other_split = prepare(options(corpus, tmp_path / "R", val_fraction=0.2))
    other_tokenizer = prepare(options(corpus, tmp_path / "S", tokenizer="bytes"))
    assert first["fingerprint"] == again["fingerprint"], "the same corpus prepared the same way"
    assert len({first["fingerprint"], other_split["fingerprint"], other_tokenizer["fingerprint"]}) == 3


def _big_chars_file(path) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for i in range(300):
            file.write("".join(f"line {i}-{j} of a corpus big enough to take a while\n" for j in range(2000)))


def test_an_interrupted_prepare_leaves_no_folder_that_looks_complete(tmp_path):
    """SIGTERM in the middle of a real ``python -m producer prepare``: no DIR, no partial folder."""
    corpus = tmp_path / "big.txt"
    _big_chars_file(corpus)
    out = tmp_path / "P"
    process = subprocess.Popen([sys.executable, "-m", "producer", "prepare", "--corpus", str(corpus), "--out", str(out),
                                "--workers", "1", "--chunk-mb", "0.5"], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers(tmp_path), "prepare never started writing"
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode != 0, stderr.decode()
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_error_in_the_middle_removes_the_partial_folder(tmp_path, monkeypatch):
    corpus = write(tmp_path / "c.txt", TEXT)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "build_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare(options(corpus, tmp_path / "P"))
    assert not (tmp_path / "P").exists() and leftovers(tmp_path) == []


BAD_INPUTS = {
    "not UTF-8": (lambda d: (d / "bad.txt").write_bytes(b"good line\n" * 300 + b"bad \xff byte\n"), {},
                  r"bad.txt is not UTF-8: undecodable byte 0xff at byte offset 3004"),
    "empty": (lambda d: (d / "e.txt").write_text(""), {}, "empty"),
    "no corpus files": (lambda d: (d / "x.md").write_text("text\n"), {}, "holds no text"),
    "jsonl without --text-field": (lambda d: (d / "d.jsonl").write_text('{"text": "a"}\n'), {"corpus": "d.jsonl"},
                                   "--text-field"),
    "jsonl line without the field": (lambda d: (d / "d.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n'),
                                     {"text_field": "text"}, r"d.jsonl:2: no text field 'text'"),
    "jsonl line not JSON": (lambda d: (d / "d.jsonl").write_text('{"text": "a"}\n{oops\n'), {"text_field": "text"},
                            r"d.jsonl:2: not JSON"),
    "tokenizer file that does not load": (lambda d: (d / "c.txt").write_text("a\n") and (d / "t.json").write_text("{]"),
                                          {"tokenizer": "t.json"}, "not a tokenizers file"),
    "missing tokenizer file": (lambda d: (d / "c.txt").write_text("a\n"), {"tokenizer": "nope.json"}, "nope.json"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path, case):
    make, overrides, message = BAD_INPUTS[case]
    source = tmp_path / "src"
    source.mkdir()
    make(source)
    overrides = {key: str(source / value) if key in ("corpus", "tokenizer") else value for key, value in overrides.items()}
    with pytest.raises(CorpusError, match=message):
        prepare(options(**{"corpus": source, "out": tmp_path / "P", **overrides}))
    assert not (tmp_path / "P").exists() and leftovers(tmp_path) == []


def test_a_vocabulary_too_large_for_the_wire_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "MAX_VOCAB_SIZE", 10)
    with pytest.raises(CorpusError, match="the wire carries at most 10"):
        prepare(options(write(tmp_path / "c.txt", "abcdefghijkl\n"), tmp_path / "P"))
    assert not (tmp_path / "P").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_a_prepared_folder_is_readable_as_the_umask_allows(tmp_path, bpe_file, umask, folder_mode, file_mode):
    previous = os.umask(umask)
    try:
        prepare(options(write(tmp_path / "c.txt", TEXT), tmp_path / "p", tokenizer=str(bpe_file)))
    finally:
        os.umask(previous)
    assert (tmp_path / "p").stat().st_mode & 0o777 == folder_mode
    assert {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "p").iterdir()} == {
        name: file_mode for name in (prepared.TOKENS_NAME, prepared.OFFSETS_NAME, prepared.MANIFEST_NAME,
                                     prepared.TOKENIZER_NAME)}


def test_an_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "P").mkdir()
    with pytest.raises(CorpusError, match="exists"):
        prepare(options(write(tmp_path / "c.txt", TEXT), tmp_path / "P"))


def test_the_cli_reports_errors_with_exit_2_and_a_summary_on_success(tmp_path):
    corpus = write(tmp_path / "c.txt", TEXT)
    command = [sys.executable, "-m", "producer", "prepare", "--corpus", str(corpus), "--workers", "1", "--out"]
    done = subprocess.run([*command, str(tmp_path / "P")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stderr.strip().splitlines()[-1].split(": ", 1)[1])
    assert summary["lines"] == 400 and summary["vocab_size"] == load_corpus(str(tmp_path / "P")).tokenizer.vocab_size
    again = subprocess.run([*command, str(tmp_path / "P")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_tokenizer_train_makes_a_byte_level_bpe_of_the_asked_size(tmp_path):
    corpus = write(tmp_path / "c.txt", TEXT * 3)
    out = tmp_path / "tok.json"
    done = subprocess.run([sys.executable, "-m", "producer", "tokenizer", "train", "--corpus", str(corpus), "--vocab-size",
                           "300", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tokenizer = HFTokenizer.from_file(out)
    assert tokenizer.base_size == 300 and tokenizer.vocab_size == 303
    ids, lengths = tokenizer.encode_text("héllo wörld [SEP] \u2603\n")
    assert tokenizer.decode(ids) == "héllo wörld [SEP] \u2603\n", "byte-level: any text round-trips"
    assert lengths.tolist() == [len(ids)] and int(ids.max()) < tokenizer.base_size, "corpus text never makes a special"


def test_a_progress_line_every_few_seconds_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    from producer import sources
    from producer.tokenizer_cli import TokenizerTrainSettings, train

    times = iter(range(100))
    lines = sources.ProgressLines(12_000_000, "prepare", every_s=5.0, clock=lambda: next(times))
    for _ in range(12):
        lines.update(1_000_000)
        lines.set_postfix(lines="1,000")
    assert capsys.readouterr().err.splitlines() == [
        "prepare: 5.0 of 12.0 MB (42 %), 1.0 MB/s, ETA 7 s, lines 1,000",
        "prepare: 10.0 of 12.0 MB (83 %), 1.0 MB/s, ETA 2 s, lines 1,000"]

    monkeypatch.setattr(sources, "PROGRESS_EVERY_S", 0.0)  # capsys's stderr is no terminal: lines, not a bar
    corpus = write(tmp_path / "c.txt", TEXT)
    prepare(options(corpus, tmp_path / "P"))
    assert re.search(r"^prepare: [\d.]+ of [\d.]+ MB \(\d+ %\), [\d.]+ MB/s, ETA \d+ s", capsys.readouterr().err, re.M)
    train(TokenizerTrainSettings(corpus=str(corpus), vocab_size=260, out=str(tmp_path / "tok.json")))
    assert re.search(r"^tokenizer train: [\d.]+ of [\d.]+ MB \(100 %\)", capsys.readouterr().err, re.M)


BAD_BYTE_TEXT = b"good line\nbad \xb1 line\nkeeps " + "\ufffd".encode() + b" as it is\n"  # one bad byte, one real U+FFFD


@pytest.mark.parametrize(("mode", "text", "replaced", "skipped"), [
    ("replace", "good line\nbad \ufffd line\nkeeps \ufffd as it is\n", 1, 0),
    ("skip-line", "good line\nkeeps \ufffd as it is\n", 0, 1),
])
def test_decode_errors_replace_or_skip_a_bad_byte_and_count_it(tmp_path, mode, text, replaced, skipped):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(BAD_BYTE_TEXT)
    with pytest.raises(CorpusError, match=r"undecodable byte 0xb1 at byte offset 14 \(prepare and tokenizer train read on"):
        prepare(options(corpus, tmp_path / "strict"))  # strict, the default
    manifest = prepare(options(corpus, tmp_path / "P", tokenizer="bytes", decode_errors=mode, val_fraction=0.0))
    assert manifest["decode_errors"] == {"mode": mode, "replaced": replaced, "skipped_lines": skipped}
    loaded = load_corpus(str(tmp_path / "P"))
    assert loaded.tokenizer.decode(np.asarray(loaded.tokens)) == text
    documents = tmp_path / "d.jsonl"  # a skipped document keeps the line numbers of the ones after it
    documents.write_bytes(b'{"t": "one"}\n{"t": "tw\xb1o"}\n{"t": "three"}\n{"x": 1}\n')
    with pytest.raises(CorpusError, match=r"d.jsonl:4: no text field 't'"):
        prepare(options(documents, tmp_path / "J", text_field="t", decode_errors=mode))

    command = [sys.executable, "-m", "producer", "prepare", "--corpus", str(corpus), "--workers", "1",
               "--decode-errors", mode, "--out", str(tmp_path / "cli")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stderr.strip().splitlines()[-1].split(": ", 1)[1])
    assert summary["decode_errors"] == {"mode": mode, "replaced": replaced, "skipped_lines": skipped}
    command = [sys.executable, "-m", "producer", "tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "260",
               "--decode-errors", mode, "--out", str(tmp_path / "tok.json")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"decode errors ({mode}): {replaced} replaced, {skipped} lines skipped" in done.stderr
    strict = subprocess.run(command[:-4] + ["--out", str(tmp_path / "strict.json")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert strict.returncode == 2 and "undecodable byte 0xb1 at byte offset 14" in strict.stderr


# VmHWM, not ru_maxrss: the latter survives exec, so a child of pytest would report pytest's own size.
STREAM_PEAKS = """
import sys
from itertools import islice
from producer.stream import BatchStream
from shared.data_config import DataConfig

def peak_mib():
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))) / 1024

stream = BatchStream(DataConfig(corpus=sys.argv[1], block_size=1024))
batches = stream.train_batches()
peaks = [peak_mib()]
for messages in (200, 1800):
    for _ in islice(batches, messages):
        pass
    peaks.append(peak_mib())
print(*peaks)
"""


def test_a_producer_on_a_prepared_corpus_stays_flat_while_it_reads_all_of_it(tmp_path):
    """A generated ~50 MB corpus (107 MB of ids and offsets, prepared with bytes): the peak RSS
    over 2,000 messages of 16 x 1024 tokens (65 MB of ids read, most of the file) grows by at
    most what one release window maps (rows are read from the map and its pages dropped every
    RELEASE_EVERY_ROWS rows), far below the file (a corpus held in memory costs several bytes per
    character). The page cache's state moves the peak within that window: cold pages map fewer
    neighbours at a fault than cached ones."""
    line = "".join(chr(97 + i % 26) for i in range(60)) + "\n"
    corpus = tmp_path / "c.txt"
    with open(corpus, "w", encoding="utf-8") as file:
        for _ in range(50_000_000 // len(line) // 1000):
            file.write(line * 1000)
    prepare(options(corpus, tmp_path / "P", tokenizer="bytes", workers=2, chunk_mb=4.0))
    mapped_mib = sum(path.stat().st_size for path in (tmp_path / "P").glob("*.npy")) / 2**20
    done = subprocess.run([sys.executable, "-c", STREAM_PEAKS, str(tmp_path / "P")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    at_start, after_200, after_2000 = map(float, done.stdout.split())
    window_mib = RELEASE_WINDOW_BYTES / 2**20
    assert after_2000 - at_start < min(window_mib, 0.6 * mapped_mib), (at_start, after_200, after_2000, mapped_mib)



@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_a_mapped_corpus_drops_its_pages_every_window_only_when_larger_than_the_window(tmp_path, monkeypatch, sampling):
    """Releasing a corpus no larger than one release window would only cost the faults that map
    it again: its resident pages cannot outgrow its files. A larger one (here: a window of 0
    bytes) is released every RELEASE_EVERY_ROWS rows read."""
    from producer import source_rows
    from producer.stream import BatchStream
    from shared.data_config import DataConfig

    monkeypatch.setenv("LINEPACK_CACHE_DIR", str(tmp_path / "cache"))
    prepare(options(write(tmp_path / "c.txt", "".join(f"line {i}\n" for i in range(3000))), tmp_path / "P"))
    config = DataConfig(corpus=str(tmp_path / "P"), block_size=32, rows_per_message=128, sampling=sampling)
    for window, releases in ((RELEASE_WINDOW_BYTES, 0), (0, 5)):
        monkeypatch.setattr(source_rows, "RELEASE_WINDOW_BYTES", window)
        stream = BatchStream(config)
        rows = stream.sources[0]
        released: list[bool] = []
        monkeypatch.setattr(rows.corpus, "release_pages", lambda released=released: released.append(True))
        assert 0 < rows.corpus.mapped_bytes < RELEASE_WINDOW_BYTES
        for k in range(20):  # 2,560 rows: 5 windows of 512
            stream.train_message(k)
        assert len(released) == releases, window

# ---- issue 26: bounded lines, verification, races, orphans -----------------------------------


@pytest.mark.parametrize("kind", ["char", "bytes"])
def test_a_line_over_the_limit_is_split_into_pieces_never_held_whole(tmp_path, kind):
    """Issue 26 item 3: one 5,000-byte line with no newline, limit 700, chunks of 1,000 bytes."""
    long = "é" + "abcdefghé" * 555  # 2-byte characters: cuts must land between characters
    corpus = write(tmp_path / "c.txt", "short\n" + long)
    manifest = prepare(options(corpus, tmp_path / "P", tokenizer=kind, max_line_bytes=700))
    mapped = load_corpus(str(tmp_path / "P"))
    text = mapped.tokenizer.decode(mapped.tokens)
    pieces = text.split("\n")[:-1]
    assert pieces[0] == "short" and "".join(pieces[1:]) == long
    assert max(len(piece.encode()) for piece in pieces) <= 700 and len(pieces) == 1 + -(-len(long.encode()) // 700)
    assert manifest["lines"] == len(pieces)


def test_a_jsonl_line_over_the_limit_is_refused_with_file_line_and_offset(tmp_path):
    corpus = write(tmp_path / "c.jsonl", '{"text": "ok"}\n' + json.dumps({"text": "x" * 3000}) + "\n")
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: the line at byte offset 15 is longer than --max-line-bytes 500"):
        prepare(options(corpus, tmp_path / "P", tokenizer="bytes", text_field="text", max_line_bytes=500))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["char", "bytes"])
def test_preparing_one_huge_line_keeps_memory_flat(tmp_path, kind):
    """A 100 MB file that is one line: peak RSS well below what holding it whole takes (before:
    1.0 GB with bytes, 3.2 GB with char for 100 MB, growing with the line; now about 96 MB,
    whatever the line)."""
    corpus = tmp_path / "one-line.txt"
    with open(corpus, "wb") as file:
        for _ in range(100):
            file.write(b"abcdefghij" * 100_000)
    # VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss over an exec, so a child of this (large)
    # test process would report at least the test's own size. The workers fork from prepare.
    script = ("import resource, sys; from producer.__main__ import main; code = main(sys.argv[1:]); "
              "hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')); "
              "print('maxrss', hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, "prepare", "--corpus", str(corpus), "--out", str(tmp_path / "P"),
                             "--tokenizer", kind, "--workers", "1", "--max-line-bytes", "1000000", "--chunk-mb", "1"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    own, children = (int(v) for v in result.stdout.split()[1:3])
    assert max(own, children) < 300_000, (own, children)  # KiB
    assert "is longer than --max-line-bytes 1000000: split" in result.stderr


def _tamper_manifest(folder, edit) -> None:
    """Edits the manifest and re-signs it (a careless or hostile writer can do both)."""
    from producer.prepared import fingerprint

    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    manifest["fingerprint"] = fingerprint(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _poke(folder, name, index, value) -> None:
    array = np.load(folder / name, mmap_mode="r+")
    array[index] = value
    array.flush()
    del array


@pytest.fixture
def folder(tmp_path):
    prepare(options(write(tmp_path / "c.txt", TEXT), tmp_path / "P", tokenizer="bytes"))
    return tmp_path / "P"


@pytest.mark.parametrize("special, name", [(256, r"\[MASK\]"), (257, r"\[SEP\]"), (258, r"\[PAD\]"),
                                           (300, "beyond the vocabulary")])
def test_special_ids_in_the_tokens_are_refused_at_open_with_their_position(folder, special, name):
    """Issue 26 item 4: [MASK] / [SEP] / [PAD] written into tokens.npy were trained on as text."""
    _poke(folder, "tokens.npy", 1234, special)
    with pytest.raises(CorpusError, match=rf"tokens.npy: token 1,234 is id {special}, {name}"):
        load_corpus(str(folder))


@pytest.mark.parametrize("index, value, message", [
    (5, 3, r"line offset 5 \(3\) is below the one before it"),
    (7, -4, r"line offset 7 \(-4\) is below"),
    (0, 1, "the first line offset is 1, not 0"),
    (400, 10**9, "the last line offset is 1000000000"),
])
def test_offsets_that_go_back_or_out_of_range_are_refused_at_open(folder, index, value, message):
    _poke(folder, "line_offsets.npy", index, value)
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(folder))


def _set_split_line(value):
    def edit(manifest):
        manifest["split"]["split_line"] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set_split_line(-1), "split_line -1 is outside 0..400"),
    (_set_split_line(10**6), "split_line 1000000 is outside"),
    (lambda m: m.pop("lines"), "has no 'lines'"),
    (lambda m: m["files"].pop("tokens.npy"), r"files\['tokens.npy'\] must be a JSON object"),
    (lambda m: m.update(tokenizer={"kind": "hf", "sha256": "0"}), "tokenizer has no 'file'"),
    (lambda m: m.update(unigram_counts=[1, "2"]), "unigram_counts must be 256 non-negative integers"),
    (lambda m: m.update(base_size="256"), "'base_size' has the wrong type"),
    (lambda m: m["split"].update(train_tokens=3), "train_tokens 3 is not the offset of split_line 360"),
    (lambda m: m.update(sources=[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]] * 2), None),
])
def test_a_damaged_manifest_is_a_clear_error_not_a_traceback(folder, edit, message):
    _tamper_manifest(folder, edit)
    if message is None:  # harmless
        load_corpus(str(folder))
        return
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(folder))


def test_deeply_nested_manifest_json_is_a_clear_error(folder):
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorpusError, match="unreadable manifest.json"):
        load_corpus(str(folder))


def test_verify_checks_every_id_and_the_digests(folder, monkeypatch):
    def verify(*extra):
        return subprocess.run([sys.executable, "-m", "producer", "prepare", "--verify", str(folder), *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    done = verify()
    assert done.returncode == 0 and "verified" in done.stderr and '"lines": 400' in done.stderr, done.stderr
    original = np.load(folder / "tokens.npy")[10]
    _poke(folder, "tokens.npy", 10, (original + 1) % 256)  # a valid id, but not the prepared one
    load_corpus(str(folder))  # the cheap checks at open cannot see it
    done = verify()
    assert done.returncode == 2 and "tokens.npy: its size or SHA-256 is not the manifest's" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    _poke(folder, "tokens.npy", 10, 256)
    assert "token 10 is id 256, [MASK]" in verify().stderr


def test_the_id_scan_at_open_is_bounded_in_time(folder, monkeypatch, capsys):
    from producer import prepared

    monkeypatch.setattr(prepared, "OPEN_SCAN_SECONDS", 0.0)
    monkeypatch.setattr(prepared, "SCAN_PIECE", 1000)
    _poke(folder, "tokens.npy", 5000, 256)  # past the first piece: not seen at open
    load_corpus(str(folder))
    assert "the ids of the first 1,000 of" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="token 5,000 is id 256"):
        prepared.verify(folder)


def test_a_truncated_gz_is_a_clear_error(tmp_path):
    """Issue 26 item 9: an EOFError traceback before."""
    data = gzip.compress(TEXT.encode() * 20)
    (tmp_path / "c.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"c.txt.gz is not a readable gzip file near byte offset"):
        prepare(options(tmp_path / "c.txt.gz", tmp_path / "P"))
    assert leftovers(tmp_path) == [] and not (tmp_path / "P").exists()


def test_losing_the_race_to_the_rename_is_a_clear_error(tmp_path, monkeypatch):
    """Issue 26 items 7, 9: two prepares to one --out; the loser died with OSError: Directory not empty."""
    rename = os.rename

    def the_other_one_won(source, target):
        os.makedirs(target)
        (target / "manifest.json").write_text("{}")
        rename(source, target)

    monkeypatch.setattr(prepare_module.os, "rename", the_other_one_won)
    with pytest.raises(CorpusError, match="was made by another prepare while this one ran"):
        prepare(options(write(tmp_path / "c.txt", TEXT), tmp_path / "P"))
    assert leftovers(tmp_path) == [] and (tmp_path / "P" / "manifest.json").read_text() == "{}"


@pytest.mark.parametrize("dtype", ["<u2", "<u4", "<i8"])
def test_npy_headers_are_numpys_own_and_one_size_for_every_length(tmp_path, dtype):
    """The header is written before the length is known and rewritten after: both must be
    NPY_HEADER_BYTES long, and numpy must read what follows them."""
    for length in (0, 5, 10**18):
        assert len(prepared.npy_header(np.dtype(dtype), length)) == prepared.NPY_HEADER_BYTES
    appender = prepared.NpyAppender(tmp_path / "a.npy", np.dtype(dtype))
    appender.append(np.arange(7))
    appender.finish()
    assert np.load(tmp_path / "a.npy").tolist() == list(range(7)) and np.load(tmp_path / "a.npy").dtype == np.dtype(dtype)
