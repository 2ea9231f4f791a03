"""The input formats (producer/formats.py): every format and compression gives ``prepare`` and the
in-memory reader the same lines as the text itself; a damaged, truncated or incomplete file and
a missing package are clear errors; the zstd frame check and the Parquet reader's bounds."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from producer import formats, sources
from producer.corpus import read_text
from producer.lines import CorpusError
from producer.prepare import PrepareSettings, prepare
from producer.prepared import OFFSETS_NAME, TOKENS_NAME
from producer.zstd_frames import FrameCheck

LINES = [f"line {i}: " + "héllo wörld ☃ " * (i % 5) + "\n" for i in range(600)]
TEXT = "".join(LINES)


def documents() -> list[str]:
    """TEXT as documents of 1 to 6 lines, some without their final line break (the reader adds it)."""
    rng, start, found = random.Random(0), 0, []
    while start < len(LINES):
        count = rng.randint(1, 6)
        document = "".join(LINES[start:start + count])
        found.append(document[:-1] if rng.random() < 0.5 else document)
        start += count
    return found


def write_parquet(path, values, row_group_size=7, **columns) -> None:
    pq.write_table(pa.table({"text": values, **columns}), path, row_group_size=row_group_size)


def write_zst(path, data: bytes, frames: int = 3) -> None:
    """``data`` as ``frames`` zstd frames, as a streaming compressor or `zstd` on concatenated files writes them."""
    step = -(-len(data) // frames)
    path.write_bytes(b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(data[i:i + step])
                              for i in range(0, len(data), step)))


def jsonl(texts) -> bytes:
    return "".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts)).encode()


CORPORA = {  # name -> (file name, write the file, --text-field)
    "txt": ("c.txt", lambda p: p.write_bytes(TEXT.encode()), None),
    "txt.zst": ("c.txt.zst", lambda p: write_zst(p, TEXT.encode()), None),
    "txt.gz": ("c.txt.gz", lambda p: p.write_bytes(gzip.compress(TEXT.encode())), None),
    "jsonl.zst": ("c.jsonl.zst", lambda p: write_zst(p, jsonl(documents())), "text"),
    "parquet": ("c.parquet", lambda p: write_parquet(p, documents()), "text"),
    "parquet binary": ("c.parquet", lambda p: write_parquet(p, [d.encode() for d in documents()]), "text"),
}


def make(tmp_path, name):
    file_name, write, field = CORPORA[name]
    path = tmp_path / name.replace(" ", "-") / file_name
    path.parent.mkdir()
    write(path)
    return path, field


def prepared_files(tmp_path, name, tokenizer):
    path, field = make(tmp_path, name)
    out = tmp_path / f"P-{name.replace(' ', '-')}"
    manifest = prepare(PrepareSettings(corpus=str(path), out=str(out), tokenizer=tokenizer, text_field=field, workers=1,
                                       chunk_mb=0.002))
    return [(out / name).read_bytes() for name in (TOKENS_NAME, OFFSETS_NAME)], manifest


@pytest.mark.parametrize("tokenizer", ["char", "bytes"])
@pytest.mark.parametrize("name", [name for name in CORPORA if name != "txt"])
def test_every_format_prepares_the_same_tokens_and_offsets_as_the_text(tmp_path, name, tokenizer):
    expected, text_manifest = prepared_files(tmp_path, "txt", tokenizer)
    found, manifest = prepared_files(tmp_path, name, tokenizer)
    assert found[0] == expected[0], f"{TOKENS_NAME} differs"
    assert found[1] == expected[1], f"{OFFSETS_NAME} differs"
    same = ("lines", "tokens", "unigram_counts", "tokenizer", "split")
    assert {key: manifest[key] for key in same} == {key: text_manifest[key] for key in same}
    [source] = manifest["sources"]
    assert source["bytes"] == os.path.getsize(source["path"]) and source["path"].endswith(CORPORA[name][0])


@pytest.mark.parametrize("name", list(CORPORA))
def test_a_text_corpus_read_in_memory_reads_every_format(tmp_path, name):
    path, field = make(tmp_path, name)
    assert read_text(str(path), field).text == TEXT


@pytest.mark.parametrize("name", list(CORPORA))
def test_progress_counts_every_byte_on_disk_once(tmp_path, name):
    path, field = make(tmp_path, name)
    updates = []

    class Progress:
        def update(self, n):
            updates.append(n)

    files = sources.list_sources(str(path), field)
    text = "".join(sources.chunk_text(chunk, field).text for chunk in sources.chunks(files, 1000, progress=Progress()))
    assert text == TEXT
    assert sum(updates) == path.stat().st_size and min(updates) >= 0


def test_a_folder_reads_every_format_and_parquet_only_with_a_text_field(tmp_path):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"one\n"))
    write_parquet(root / "b" / "c.parquet", ["two", "", "three\n"])
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(["four"])))
    (root / "e.zst").write_bytes(zstandard.ZstdCompressor().compress(b"not named as a format\n"))
    assert read_text(str(root), "text").text == "one\ntwo\nthree\nfour\n"
    assert read_text(str(root)).text == "one\n", "parquet and jsonl need --text-field"
    assert [s.path.name for s in sources.list_sources(str(root), "text")] == ["a.txt.zst", "c.parquet", "d.jsonl.zst"]


@pytest.mark.parametrize(("name", "message"), [
    ("c.txt.zst", r"c.txt.zst is not a readable zstd file near byte offset \d+ of its content \(EOFError: the file ends "
                  r"inside a zstd frame"),
    ("c.parquet", r"c.parquet is not a readable Parquet file"),
])
def test_a_truncated_file_is_a_clear_error(tmp_path, name, message):
    whole = tmp_path / ("whole" + name[1:])
    if name.endswith(".zst"):
        write_zst(whole, TEXT.encode(), frames=2)
    else:
        write_parquet(whole, documents())
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(CorpusError, match=message):
        prepare(PrepareSettings(corpus=str(tmp_path / name), out=str(tmp_path / "P"), text_field="text", workers=1))
    assert not (tmp_path / "P").exists()


BAD_PARQUET = {
    "no such column": (lambda p: write_parquet(p, ["a"]), "body", r"c.parquet: no column 'body' \(its columns: text\)"),
    "a null value": (lambda p: write_parquet(p, ["a", "b", None], row_group_size=2), "text",
                     r"c.parquet: row 2: no text in column 'text' \(null\)"),
    "not text": (lambda p: write_parquet(p, ["a"], number=[1]), "number", r"column 'number' holds int64, not text"),
    "not parquet": (lambda p: p.write_bytes(b"PAR1 but not really\n"), "text", r"c.parquet is not a readable Parquet file"),
}


@pytest.mark.parametrize("case", BAD_PARQUET)
def test_a_bad_parquet_file_is_a_clear_error(tmp_path, case):
    write, field, message = BAD_PARQUET[case]
    write(tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match=message):
        read_text(str(tmp_path / "c.parquet"), field)


def test_a_parquet_file_needs_a_text_field_and_no_compression_around_it(tmp_path):
    write_parquet(tmp_path / "c.parquet", ["a"])
    with pytest.raises(CorpusError, match=r"c.parquet is Parquet: name the field that holds the text with --text-field"):
        read_text(str(tmp_path / "c.parquet"))
    (tmp_path / "c.parquet.gz").write_bytes(gzip.compress((tmp_path / "c.parquet").read_bytes()))
    with pytest.raises(CorpusError, match=r"Parquet files are compressed inside; .gz around one is not read"):
        read_text(str(tmp_path / "c.parquet.gz"), "text")


def test_undecodable_bytes_in_a_parquet_column_follow_decode_errors(tmp_path):
    write_parquet(tmp_path / "c.parquet", [b"good\n", b"b\xffad", b"fine"])
    with pytest.raises(CorpusError, match=r"c.parquet is not UTF-8: undecodable byte 0xff at byte offset 6"):
        read_text(str(tmp_path / "c.parquet"), "text")
    files = sources.list_sources(str(tmp_path / "c.parquet"), "text")
    chunk = next(sources.chunks(files, 1000))
    assert sources.chunk_text(chunk, "text", "replace") == sources.Text("good\nb\ufffdad\nfine\n", replaced=1)
    assert sources.chunk_text(chunk, "text", "skip-line") == sources.Text("good\nfine\n", skipped_lines=1)


@pytest.mark.parametrize(("module", "file_name"), [("pyarrow", "c.parquet"), ("zstandard", "c.jsonl.zst")])
def test_a_missing_package_is_an_error_naming_the_extra(tmp_path, monkeypatch, module, file_name):
    (tmp_path / file_name).write_bytes(b"")
    found = formats.importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None if name == module else found(name))
    with pytest.raises(CorpusError, match=rf"{file_name}: reading \.\w+ files needs the {module} package of Linepack's "
                                          rf"'formats' extra \(pip install -e '\.\[formats\]' in the checkout"):
        sources.list_sources(str(tmp_path / file_name), "text")


def test_the_parquet_reader_decodes_a_batch_at_a_time(tmp_path, monkeypatch):
    """A row group of 5,000 documents is read 100 rows at a time: never more than one batch ahead."""
    monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 100)
    expected = "".join(f"document {i}\n" for i in range(5000)).encode()
    write_parquet(tmp_path / "c.parquet", [f"document {i}" for i in range(5000)], row_group_size=5000)
    with open(tmp_path / "c.parquet", "rb") as raw:
        lines = formats.FORMATS[".parquet"].open(raw, tmp_path / "c.parquet", "text")
        batches = []
        lines.batches = (batches.append(batch) or batch for batch in lines.batches)
        first = lines.read(50)
        assert first == expected[:50] and len(batches) == 1
        rest = lines.read(10**9)
    assert len(batches) == 50 and max(batch.num_rows for batch in batches) == 100
    assert first + rest == expected


# ---- the zstd frame check ---------------------------------------------------------------------

NOISE = random.Random(1).randbytes(3000)  # incompressible: raw blocks


def _frames() -> list[bytes]:
    """Frames with every kind of block (compressed, RLE, raw), with and without checksum and
    content size, and a skippable frame."""
    streamed = io.BytesIO()
    with zstandard.ZstdCompressor(write_content_size=False).stream_writer(streamed, closefd=False) as stream:
        stream.write(b"a" * 300_000 + NOISE)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    return [zstandard.ZstdCompressor(write_checksum=True).compress(TEXT.encode()), skippable, streamed.getvalue(),
            zstandard.ZstdCompressor(level=19).compress(NOISE)]


FRAMES = b"".join(_frames())
FRAME_ENDS = set(itertools.accumulate(len(frame) for frame in _frames()))
CONTENT = TEXT.encode() + b"a" * 300_000 + NOISE + NOISE


def _read_all(data: bytes, read_size: int = 1 << 20) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(FrameCheck(io.BytesIO(data)), read_across_frames=True,
                                                        read_size=read_size)
    return b"".join(iter(lambda: reader.read(1 << 16), b""))


def test_whole_frames_of_every_kind_read_through():
    assert _read_all(FRAMES, read_size=7) == CONTENT
    for end in sorted(FRAME_ENDS):  # a file may end after any whole frame
        assert CONTENT.startswith(_read_all(FRAMES[:end]))


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(min_value=1, max_value=len(FRAMES) - 1), read_size=st.integers(min_value=1, max_value=5000))
def test_a_zstd_stream_cut_inside_a_frame_is_an_error_and_between_frames_is_not(cut, read_size):
    if cut in FRAME_ENDS:
        assert CONTENT.startswith(_read_all(FRAMES[:cut], read_size))
        return
    with pytest.raises(EOFError, match="the file ends inside a zstd frame"):
        _read_all(FRAMES[:cut], read_size)


def test_a_file_that_is_not_zstd_is_refused():
    with pytest.raises(ValueError, match="not a zstd frame"):
        _read_all(b"hello world, not compressed\n")
