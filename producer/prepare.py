"""``python -m producer prepare``: tokenize a corpus once into a memory-mappable folder (docs/SPEC.md §2.7).

    python -m producer prepare --corpus PATH [--tokenizer char|bytes|FILE] [--val-fraction F]
                               [--workers N] [--text-field NAME] [--decode-errors strict|replace|skip-line]
                               [--max-line-bytes N] --out DIR
    python -m producer prepare --verify DIR

``PATH`` is a file or a folder (read recursively, in sorted order) of ``.txt`` files and, with
``--text-field``, ``.jsonl`` files (one JSON object a line; that field's text is the document)
and ``.parquet`` files (that column's values are the documents); ``.gz`` and ``.zst`` of ``.txt``
and ``.jsonl`` are read as they stream (:mod:`producer.formats`). The text is cut into chunks of whole lines that
``--workers`` processes tokenize (:meth:`shared.tokenizer.Tokenizer.encode_text`, every line on
its own) while this process appends the ids and the line offsets to the folder, so memory stays
bounded whatever the corpus size and shape: at most two chunks per worker are in flight, and no
line longer than ``--max-line-bytes`` (4 MB) is held whole (a text line is split into pieces of at
most that many bytes, a JSON line refused with its file, line and byte offset). The ``char``
tokenizer first reads the corpus once for its vocabulary. A progress bar (MB/s, lines, ETA)
shows on a terminal; elsewhere (a log) a progress line every few seconds. Bytes that are not
UTF-8 stop it (the file and byte offset named) unless ``--decode-errors`` is ``replace`` or
``skip-line`` (:mod:`producer.sources`); the manifest's ``decode_errors`` and the summary line
then say how many sequences were replaced, lines skipped.

Everything is written into ``DIR.partial-*`` beside ``DIR`` and renamed to ``DIR`` at the end;
an error or a signal removes the partial folder, and one left by a prepare that was killed
(its owner lock is free) is removed by the next prepare to the same ``DIR``. A second prepare
to a ``DIR`` being written, or one that loses the race to the rename, exits 2 naming the other;
pool workers die with this process (``PR_SET_PDEATHSIG``). The folder and its files get ordinary
permissions (what the umask allows, 0755 and 0644 for the usual 022): a prepared corpus is data
that other users and containers (the image runs as uid 1000) read. Clear errors (one line, exit 2),
nothing half-written: a file that is not UTF-8 (named with its byte offset, under
``--decode-errors strict``), a truncated ``.gz`` or ``.zst``, a damaged ``.parquet``, an empty corpus, a tokenizer file that does not
load, a vocabulary too large for the wire, a jsonl line without the field, a full disk.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import errno
import fcntl
import glob
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer import formats, prepared, sources
from producer.lines import CorpusError, split_point
from producer.sources import Chunk
from shared import settings
from shared.data_config import DEFAULT_VAL_FRACTION
from shared.limits import MAX_VOCAB_SIZE
from shared.settings import setting
from shared.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, tokenizer_from_definition
from shared.vocab import VocabularyError, id_dtype

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file-size limit, as full as a full disk
COUNT_CHUNK = 1 << 22  # tokens per bincount pass over the written ids (numpy widens them to int64)


@dataclass(frozen=True)
class PrepareSettings:
    corpus: str | None = setting(None, formats.CORPUS_HELP, metavar="PATH")
    tokenizer: str = setting("char", "char, bytes, or the path of a Hugging Face tokenizers JSON file", metavar="KIND|FILE")
    val_fraction: float = setting(DEFAULT_VAL_FRACTION, "fraction of lines (the last ones) held out for validation",
                                  check=settings.in_range(0.0, 1.0, name="val fraction", high_open=True))
    workers: int = setting(0, "tokenizing processes; 0 = one per core", metavar="N", check=settings.at_least(0))
    text_field: str | None = setting(None, formats.TEXT_FIELD_HELP, metavar="NAME")
    chunk_mb: float = setting(4.0, "MB of text per chunk handed to a worker", metavar="MB", check=settings.above(0))
    decode_errors: str = sources.decode_errors_setting()
    max_line_bytes: int = setting(sources.DEFAULT_MAX_LINE_BYTES,
                                  "the longest line held, in bytes: a longer text line is split into pieces of at most "
                                  "this many bytes, a longer .jsonl line refused", metavar="BYTES", check=settings.at_least(16))
    out: str | None = setting(None, "the folder to create (it must not exist yet)", metavar="DIR")
    verify: str | None = setting(None, "instead of preparing: check everything of the prepared folder DIR (manifest, "
                                 "tokenizer, offsets, every id, file sizes and SHA-256, unigram counts); exit 2 naming "
                                 "the first problem", metavar="DIR")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser("prepare", help="tokenize a corpus once into a memory-mapped folder",
                                    description="Tokenize a corpus into token ids and line offsets that producers memory-map.")
    settings.add_arguments(command, PrepareSettings)
    command.set_defaults(handler=run_prepare, command_parser=command)


# ---- the workers ------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """A pool worker's first act: the kernel kills it when its parent dies (SIGKILL included),
    so that it never lingers, reparented to init (Linux; elsewhere the pool's pipes end it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _start_worker(parent: int, kind: str, definition: str) -> None:
    global _worker_tokenizer
    _die_with(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker is one of the processes that share the cores
    _worker_tokenizer = tokenizer_from_definition(kind, definition)


def _encode(chunk: Chunk, text_field: str | None, decode_errors: str,
            dtype: str) -> tuple[np.ndarray, np.ndarray, sources.Text]:
    """A worker's job: the ids (in the corpus dtype) and per-line lengths of one chunk, and its
    decoding counts (the text itself left out: it does not travel back)."""
    decoded = sources.chunk_text(chunk, text_field, decode_errors)
    try:
        ids, lengths = _worker_tokenizer.encode_text(decoded.text)
    except VocabularyError as error:
        raise CorpusError(f"{chunk.source}: {error}") from None
    return ids.astype(dtype), lengths, dataclasses.replace(decoded, text="")


def _characters(chunk: Chunk, text_field: str | None, decode_errors: str) -> np.ndarray:
    """A worker's job of the vocabulary pass: the distinct code points of one chunk."""
    text = sources.chunk_text(chunk, text_field, decode_errors).text
    return np.unique(np.frombuffer(text.encode("utf-32-le"), dtype="<u4"))


def _started(pool: ProcessPoolExecutor) -> ProcessPoolExecutor:
    """``pool`` with its workers forked now, not at the first chunk: before this process reads a
    file (a Parquet reader's pyarrow, its buffers) that each worker would otherwise inherit."""
    pool.submit(int).result()
    return pool


def _ordered(pool: ProcessPoolExecutor, function, chunks: Iterator[Chunk], in_flight: int, *args: Any) -> Iterator[Any]:
    """``function(chunk, *args)`` in ``pool`` for every chunk, results in order, at most
    ``in_flight`` chunks submitted and not yet consumed (the memory bound)."""
    pending: collections.deque[Future] = collections.deque()
    for chunk in chunks:
        pending.append(pool.submit(function, chunk, *args))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---- the pipeline -----------------------------------------------------------------------------

def character_tokenizer(pool: ProcessPoolExecutor, options: PrepareSettings, files: list[sources.Source],
                        in_flight: int) -> CharTokenizer:
    """The char tokenizer of the whole corpus (a first pass over it)."""
    seen = np.zeros(0, dtype="<u4")
    chunks = sources.chunks(files, int(options.chunk_mb * 1e6), options.max_line_bytes)
    for codepoints in _ordered(pool, _characters, chunks, in_flight, options.text_field, options.decode_errors):
        seen = np.union1d(seen, codepoints)
    if not np.any(seen != ord("\n")):
        raise CorpusError(f"corpus {options.corpus} is empty (it has no characters besides line breaks)")
    return CharTokenizer(seen.astype("<u4").tobytes().decode("utf-32-le"))


def write_ids(pool: ProcessPoolExecutor, options: PrepareSettings, files: list[sources.Source], tokenizer: Tokenizer,
              folder: Path, in_flight: int) -> tuple[dict[str, Any], dict[str, Any], int, dict[str, Any]]:
    """Tokenizes every chunk into ``folder``'s tokens and offsets; their manifest entries, the
    line count and the manifest's ``decode_errors`` entry (mode, replaced, skipped_lines)."""
    dtype = id_dtype(tokenizer.vocab_size)
    tokens = prepared.NpyAppender(folder / prepared.TOKENS_NAME, dtype)
    offsets = prepared.NpyAppender(folder / prepared.OFFSETS_NAME, np.int64)
    offsets.append(np.zeros(1, np.int64))
    total = sum(source.bytes for source in files)
    progress = sources.progress_bar(total, "prepare")
    lines = replaced = skipped = 0
    try:
        chunks = sources.chunks(files, int(options.chunk_mb * 1e6), options.max_line_bytes, progress)
        for ids, lengths, decoded in _ordered(pool, _encode, chunks, in_flight, options.text_field, options.decode_errors,
                                              dtype.str):
            offsets.append(tokens.length + np.cumsum(lengths))
            tokens.append(ids)
            lines += len(lengths)
            replaced += decoded.replaced
            skipped += decoded.skipped_lines
            progress.set_postfix(lines=f"{lines:,}", refresh=False)
    finally:
        progress.close()
    decode_errors = {"mode": options.decode_errors, "replaced": replaced, "skipped_lines": skipped}
    return tokens.finish(), offsets.finish(), lines, decode_errors


def read_ids(path: Path, dtype: str, start: int, count: int) -> np.ndarray:
    """``count`` values from index ``start`` of a 1-D ``.npy`` file written by :class:`prepared.NpyAppender`,
    read (not mapped: the file's pages are dropped from the cache right after, and a map would pin them)."""
    item = np.dtype(dtype).itemsize
    with open(path, "rb") as file:
        file.seek(prepared.NPY_HEADER_BYTES + start * item)
        return np.fromfile(file, dtype=dtype, count=count)


def train_unigram_counts(folder: Path, entry: dict[str, Any], train_tokens: int, base_size: int) -> list[int]:
    """Occurrences of each base id in the first ``train_tokens`` ids, read back in pieces."""
    counts = np.zeros(base_size, dtype=np.int64)
    for start in range(0, train_tokens, COUNT_CHUNK):
        piece = read_ids(folder / prepared.TOKENS_NAME, entry["dtype"], start, min(COUNT_CHUNK, train_tokens - start))
        counts += np.bincount(piece, minlength=base_size)[:base_size]
    return counts.tolist()


def prepare(options: PrepareSettings) -> dict[str, Any]:
    """Writes the prepared folder ``options.out``; returns its manifest. Raises CorpusError."""
    out = Path(options.out)
    if out.exists():
        raise CorpusError(f"{out} exists: remove it or choose another --out (a prepared folder is never overwritten)")
    files = sources.list_sources(options.corpus, options.text_field)
    started = time.monotonic()
    workers = options.workers or os.cpu_count() or 1
    in_flight = 2 * workers
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    folder = Path(tempfile.mkdtemp(prefix=f"{out.name}{PARTIAL}", dir=out.parent))
    folder.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700, private to this user
    try:
        owner = _own(folder)
        tokenizer = None if options.tokenizer == "char" else _load(options.tokenizer)
        with _started(ProcessPoolExecutor(workers, initializer=_die_with, initargs=(os.getpid(),))) as pool:
            if tokenizer is None:
                tokenizer = character_tokenizer(pool, options, files, in_flight)
        if tokenizer.vocab_size > MAX_VOCAB_SIZE:
            raise CorpusError(f"the vocabulary has {tokenizer.vocab_size} ids with the specials: the wire carries at most {MAX_VOCAB_SIZE}")
        with _started(ProcessPoolExecutor(workers, initializer=_start_worker,
                                          initargs=(os.getpid(), tokenizer.kind, tokenizer.definition))) as pool:
            tokens, offsets, lines, decode_errors = write_ids(pool, options, files, tokenizer, folder, in_flight)
        manifest = build_manifest(folder, options, files, tokenizer, tokens, offsets, lines, decode_errors)
        for name in (prepared.TOKENS_NAME, prepared.OFFSETS_NAME):  # after the unigram counts read the ids back
            prepared.drop_from_page_cache(folder / name)
        if tokenizer.kind == "hf":
            shutil.copyfile(options.tokenizer, folder / prepared.TOKENIZER_NAME)
        (folder / prepared.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.unlink(folder / OWNER_NAME)  # the lock itself stays held on the open file until the rename
        try:
            os.rename(folder, out)
        except OSError:
            if out.exists():
                raise CorpusError(f"{out} was made by another prepare while this one ran (it lost the race; "
                                  "the other folder is kept)") from None
            raise
        owner.close()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    manifest["seconds"] = round(time.monotonic() - started, 3)
    return manifest


def _umask() -> int:
    """This process's umask (reading it means setting it; it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


PARTIAL = ".partial-"  # DIR.partial-XXXX: a prepare in progress, or the remains of one that died
OWNER_NAME = ".owner"  # in a partial folder: locked (flock) by the prepare writing it, and naming it
STALE_UNLOCKED_S = 60.0  # a partial folder with no owner file is stale once unchanged this long


def _own(folder: Path):
    """Locks ``folder`` for this process (until the returned file is closed or the process ends)."""
    owner = open(folder / OWNER_NAME, "w", encoding="utf-8")  # noqa: SIM115 - held open while preparing
    fcntl.flock(owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    owner.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    owner.flush()
    return owner


def remove_stale_partials(out: Path) -> None:
    """Removes the ``out.partial-*`` folders of prepares that died (their owner lock is free, or
    an old one has none); raises CorpusError when a live prepare is writing ``out``."""
    for partial in out.parent.glob(f"{glob.escape(out.name)}{PARTIAL}*"):
        try:
            with open(partial / OWNER_NAME, encoding="utf-8") as owner:
                try:
                    fcntl.flock(owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise CorpusError(f"another prepare ({owner.read(200).strip()}) is writing {out} "
                                      f"(in {partial.name}): wait for it, or choose another --out") from None
        except FileNotFoundError:  # being made or renamed this instant, or left by a prepare that had no lock
            try:
                if time.time() - partial.stat().st_mtime < STALE_UNLOCKED_S:
                    continue
            except FileNotFoundError:
                continue
        except NotADirectoryError:
            continue
        print(f"prepare: removing {partial}, left by a prepare that died", file=sys.stderr)
        shutil.rmtree(partial, ignore_errors=True)


def _load(spec: str) -> Tokenizer:
    try:
        return load_tokenizer(spec)
    except VocabularyError as error:
        raise CorpusError(str(error)) from None


def build_manifest(folder: Path, options: PrepareSettings, files: list[sources.Source], tokenizer: Tokenizer,
                   tokens: dict[str, Any], offsets: dict[str, Any], lines: int, decode_errors: dict[str, Any]) -> dict[str, Any]:
    if tokens["length"] == 0 or lines == 0:
        raise CorpusError(f"corpus {options.corpus} is empty")
    split_line = split_point(lines, options.val_fraction)
    train_tokens = int(read_ids(folder / prepared.OFFSETS_NAME, offsets["dtype"], split_line, 1)[0])
    manifest = {
        "format": prepared.FORMAT,
        "format_version": prepared.FORMAT_VERSION,
        "tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.digest,
                      **({"vocab": tokenizer.definition} if tokenizer.kind == "char" else {}),
                      **({"file": prepared.TOKENIZER_NAME} if tokenizer.kind == "hf" else {})},
        "base_size": tokenizer.base_size,
        "vocab_size": tokenizer.vocab_size,
        "lines": lines,
        "tokens": tokens["length"],
        "split": {"val_fraction": options.val_fraction, "split_line": split_line, "train_lines": split_line,
                  "val_lines": lines - split_line, "train_tokens": train_tokens},
        "unigram_counts": train_unigram_counts(folder, tokens, train_tokens, tokenizer.base_size),
        "sources": [{"path": str(source.path), "bytes": source.bytes} for source in files],
        "text_field": options.text_field,
        "decode_errors": decode_errors,
        "files": {prepared.TOKENS_NAME: tokens, prepared.OFFSETS_NAME: offsets},
    }
    manifest["fingerprint"] = prepared.fingerprint(manifest)
    return manifest


def run_prepare(args: argparse.Namespace) -> int:
    try:
        options = settings.from_namespace(PrepareSettings, args)
    except ValueError as error:
        args.command_parser.error(str(error))
    if options.verify is not None:
        try:
            summary = prepared.verify(options.verify)
        except CorpusError as error:
            print(f"prepare --verify: {error}", file=sys.stderr)
            return 2
        print(f"verified {options.verify}: " + json.dumps(summary), file=sys.stderr)
        return 0
    if options.corpus is None or options.out is None:
        args.command_parser.error("prepare needs --corpus PATH and --out DIR (or --verify DIR)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # leave through SystemExit: the partial folder goes
    try:
        manifest = prepare(options)
    except CorpusError as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        print(f"prepare: the disk is full writing {options.out} ({os.strerror(error.errno)}); nothing was left behind",
              file=sys.stderr)
        return 2
    summary = {key: manifest[key] for key in ("lines", "tokens", "vocab_size", "fingerprint", "seconds", "decode_errors")}
    source_bytes = sum(source["bytes"] for source in manifest["sources"])
    summary["mb_per_s"] = round(source_bytes / 1e6 / max(manifest["seconds"], 1e-9), 2)
    print(f"prepared {options.out}: " + json.dumps(summary), file=sys.stderr)
    return 0
