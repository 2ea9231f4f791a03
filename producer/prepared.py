"""The prepared-corpus folder (docs/SPEC.md §2.7): written by ``python -m producer prepare``,
memory-mapped by every producer.

    DIR/manifest.json       format version, tokenizer (kind, SHA-256; the characters for char),
                            vocabulary size, line and token counts, the split point, train
                            unigram counts, sources, file sizes and hashes, and a fingerprint
    DIR/tokens.npy          token ids, uint16 when every id fits, else uint32 (N,)
    DIR/line_offsets.npy    int64 (L + 1,): line i is tokens[offsets[i]:offsets[i + 1]]
    DIR/tokenizer.json      a copy of the tokenizers file (hf tokenizers only)

Both ``.npy`` files are plain NumPy arrays (``np.load(path, mmap_mode="r")`` reads them). A
producer maps them read-only: producers on one host share one copy in the page cache, and each
drops its own resident pages now and then (:meth:`MappedArray.release`), so its memory stays flat
whatever the corpus size. The manifest is written last, into a folder that gets its final name
only when everything is in it, so an interrupted prepare never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from producer.lines import CorpusError, TokenCorpus
from shared.digest import short_sha256
from shared.meta import canonical_json
from shared.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, sha256_hex
from shared.vocab import SPECIAL_TOKENS, VocabularyError, id_dtype

MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.npy"
OFFSETS_NAME = "line_offsets.npy"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "linepack-prepared"
FORMAT_VERSION = 1
NPY_HEADER_BYTES = 128  # a fixed-size .npy header, so the shape can be written once it is known
SCAN_PIECE = 1 << 22  # values read at a time by the checks
OPEN_SCAN_SECONDS = 1.0  # the id scan at open stops after this long; prepare --verify scans every id


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder with a manifest: a prepared corpus (complete or not, :func:`open_prepared` says)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def fingerprint(manifest: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of the manifest without its fingerprint."""
    body = {key: value for key, value in manifest.items() if key != "fingerprint"}
    return short_sha256(canonical_json(body).encode())


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """NumPy's own format 1.0 header for a 1-D array of ``length`` values: :data:`NPY_HEADER_BYTES`
    bytes for every length up to 10**18 (numpy pads the header to a multiple of 64 bytes)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": (length,)})
    return header.getvalue()


class NpyAppender:
    """A 1-D ``.npy`` file written in pieces: the header is rewritten with the length at :meth:`finish`.

    Keeps the SHA-256 and the count of what was appended.
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.length = 0
        self.sha256 = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 - kept open while appending
        self._file.write(npy_header(self.dtype, 10**18))

    def append(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        self._file.write(data)
        self.sha256.update(data)
        self.length += len(values)

    def finish(self) -> dict[str, Any]:
        """Writes the real header, flushes to disk, closes; the file's entry for the manifest."""
        self._file.seek(0)
        self._file.write(npy_header(self.dtype, self.length))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"dtype": self.dtype.str, "length": self.length, "bytes": self.path.stat().st_size,
                "sha256": self.sha256.hexdigest()}


def drop_from_page_cache(path: Path) -> None:
    """Asks the kernel to forget the cached pages of a file just written (it is on disk).

    Written pages sit in the page cache as large folios, which a producer's map would take in
    whole at a row's first read; dropped, they come back a page at a time (MADV_RANDOM).
    """
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class MappedArray:
    """A 1-D ``.npy`` file mapped read-only: :attr:`array` reads the file's pages on demand.

    The file stays open, so that :meth:`check_size` can tell that the mapped file itself (not
    whatever the path names now) was truncated before a read would fault (SIGBUS)."""

    def __init__(self, path: Path, dtype: str, length: int) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - kept open while mapped
        try:
            version = np.lib.format.read_magic(self._file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, found = read_header(self._file)
        except (ValueError, SyntaxError) as error:  # numpy's errors for a damaged header
            self._file.close()
            raise CorpusError(f"{path} is not a NumPy array file ({error})") from None
        self.offset = self._file.tell()
        self.size = self.offset + length * found.itemsize
        if shape != (length,) or fortran or found != np.dtype(dtype):
            self._file.close()
            raise CorpusError(f"{path}: holds {found} {shape}, the manifest says {dtype} ({length},)")
        if os.fstat(self._file.fileno()).st_size != self.size:
            self._file.close()
            raise CorpusError(f"{path} has the wrong size: the folder is damaged or incomplete")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._map.madvise(mmap.MADV_RANDOM)  # rows are read at random: no read-ahead of pages nobody wants
        # Nor 2 MB at a time: a page-cache huge folio would be mapped whole at a row's first read,
        # and the resident size would follow the corpus size instead of the rows read.
        self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.array = np.frombuffer(self._map, dtype=found, count=length, offset=self.offset)

    def release(self) -> None:
        """Drops this process's resident pages; the page cache keeps them for the next read."""
        self._map.madvise(mmap.MADV_DONTNEED)

    def check_size(self) -> None:
        """Raises CorpusError if the mapped file has shrunk (a read past its end would be SIGBUS)."""
        size = os.fstat(self._file.fileno()).st_size
        if size < self.size:
            raise CorpusError(f"{self.path} shrank from {self.size:,} to {size:,} bytes while in use: a prepared folder "
                              "must not change while producers read it (replace it by renaming a new folder into place)")

    def pieces(self, read: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(index of the first value, values)`` over the whole array, :data:`SCAN_PIECE` at a time:
        slices of the map (its pages come in one at a time, as a producer's rows do: call
        :meth:`release` after), or with ``read`` copies read from the file (read-ahead, for a
        whole pass: the page cache then holds the file in large folios, which a later map
        would take in whole)."""
        dtype = self.array.dtype
        for start in range(0, len(self.array), SCAN_PIECE):
            count = min(SCAN_PIECE, len(self.array) - start)
            if not read:
                yield start, self.array[start:start + count]
                continue
            data = os.pread(self._file.fileno(), count * dtype.itemsize, self.offset + start * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                raise CorpusError(f"{self.path} ended early at value {start + len(data) // dtype.itemsize:,}")
            yield start, np.frombuffer(data, dtype=dtype)

    def sha256(self) -> str:
        """SHA-256 of the data after the header (the manifest's ``files`` entry)."""
        digest = hashlib.sha256()
        for _, piece in self.pieces(read=True):
            digest.update(piece.tobytes())
        return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # deep nesting raises RecursionError
        raise CorpusError(f"{folder}: unreadable {MANIFEST_NAME} ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{folder}/{MANIFEST_NAME} is not a Linepack prepared-corpus manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"{folder}: prepared-corpus format {manifest.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    if manifest.get("fingerprint") != fingerprint(manifest):
        raise CorpusError(f"{folder}/{MANIFEST_NAME} does not match its fingerprint: it was changed after prepare")
    check_manifest(folder, manifest)
    return manifest


# The manifest's schema (docs/PROTOCOL.md §10): key -> type, for the manifest and its parts.
MANIFEST_FIELDS = {"tokenizer": dict, "base_size": int, "vocab_size": int, "lines": int, "tokens": int, "split": dict,
                   "unigram_counts": list, "sources": list, "text_field": (str, type(None)), "files": dict}
SPLIT_FIELDS = {"val_fraction": (int, float), "split_line": int, "train_lines": int, "val_lines": int, "train_tokens": int}
FILE_FIELDS = {"dtype": str, "length": int, "bytes": int, "sha256": str}
TOKENIZER_FIELDS = {"char": {"kind": str, "sha256": str, "vocab": str}, "bytes": {"kind": str, "sha256": str},
                    "hf": {"kind": str, "sha256": str, "file": str}}
FILE_DTYPES = {TOKENS_NAME: ("<u2", "<u4"), OFFSETS_NAME: ("<i8",)}


def _fields(where: str, value: Any, schema: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CorpusError(f"{where} must be a JSON object")
    for key, kind in schema.items():
        if key not in value:
            raise CorpusError(f"{where} has no {key!r}")
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise CorpusError(f"{where}: {key!r} has the wrong type ({type(value[key]).__name__})")
    return value


def check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Raises CorpusError unless the manifest has every field, of its type, consistent with the
    others (no KeyError or IndexError later)."""
    where = f"{folder}/{MANIFEST_NAME}"
    _fields(where, manifest, MANIFEST_FIELDS)
    kind = manifest["tokenizer"].get("kind")
    if kind not in TOKENIZER_FIELDS:
        raise CorpusError(f"{where}: tokenizer kind {str(kind)[:40]!r} is not one of {sorted(TOKENIZER_FIELDS)}")
    _fields(f"{where} tokenizer", manifest["tokenizer"], TOKENIZER_FIELDS[kind])
    lines, base_size = manifest["lines"], manifest["base_size"]
    if base_size < 1 or manifest["vocab_size"] != base_size + 3 or lines < 1 or manifest["tokens"] < 1:
        raise CorpusError(f"{where}: base_size {base_size}, vocab_size {manifest['vocab_size']}, lines {lines} and tokens "
                          f"{manifest['tokens']} must be positive, vocab_size = base_size + 3")
    split = _fields(f"{where} split", manifest["split"], SPLIT_FIELDS)
    split_line = split["split_line"]
    if not 0 <= split_line <= lines or (split["train_lines"], split["val_lines"]) != (split_line, lines - split_line):
        raise CorpusError(f"{where}: split_line {split['split_line']} is outside 0..{lines} or disagrees with train_lines "
                          f"and val_lines")
    for name, dtypes in FILE_DTYPES.items():
        entry = _fields(f"{where} files[{name!r}]", manifest["files"].get(name), FILE_FIELDS)
        if entry["dtype"] not in dtypes:
            raise CorpusError(f"{where}: {name} has dtype {entry['dtype'][:20]!r}, not one of {dtypes}")
    stored = manifest["files"][TOKENS_NAME]["dtype"]
    if np.dtype(stored).itemsize < id_dtype(manifest["vocab_size"]).itemsize:
        raise CorpusError(f"{where}: {TOKENS_NAME} is {stored}, too small for {manifest['vocab_size']} ids")
    counts = manifest["unigram_counts"]
    if len(counts) != base_size or not all(type(c) is int and c >= 0 for c in counts):
        raise CorpusError(f"{where}: unigram_counts must be {base_size} non-negative integers")


def check_offsets(folder: Path, offsets: MappedArray, n_tokens: int, split: dict[str, Any], read: bool = False) -> None:
    """Raises CorpusError unless the line offsets start at 0, never go back, end at ``n_tokens``,
    and the split's ``train_tokens`` is the offset of ``split_line`` (one vectorized pass;
    ``read``: see :meth:`MappedArray.pieces`)."""
    previous = 0
    for start, piece in offsets.pieces(read=read):
        back = np.flatnonzero(np.diff(piece, prepend=previous) < 0)
        if start == 0 and piece[0] != 0:
            raise CorpusError(f"{offsets.path}: the first line offset is {int(piece[0])}, not 0")
        if back.size:
            index = int(back[0])
            before = int(piece[index - 1]) if index else previous
            raise CorpusError(f"{offsets.path}: line offset {start + index:,} ({int(piece[index])}) is below the one before "
                              f"it ({before}): lines would overlap")
        previous = int(piece[-1])
    if previous != n_tokens:
        raise CorpusError(f"{offsets.path}: the last line offset is {previous}, the folder has {n_tokens:,} tokens")
    if int(offsets.array[split["split_line"]]) != split["train_tokens"]:
        raise CorpusError(f"{folder}/{MANIFEST_NAME}: train_tokens {split['train_tokens']} is not the offset of split_line "
                          f"{split['split_line']} ({int(offsets.array[split['split_line']])})")


def check_ids(tokens: MappedArray, base_size: int, seconds: float | None) -> int:
    """Raises CorpusError, naming the first position, if ``tokens`` holds an id that is not a base
    id (Linepack's ``[MASK]``, ``[SEP]``, ``[PAD]`` or beyond the vocabulary): a vectorized
    scan, stopped after ``seconds`` (None: the whole array, read from the file). Returns how many
    ids were checked."""
    deadline = None if seconds is None else time.monotonic() + seconds
    for start, piece in tokens.pieces(read=seconds is None):
        if piece.size and int(piece.max()) >= base_size:
            index = int(np.argmax(piece >= base_size))
            value = int(piece[index])
            what = SPECIAL_TOKENS[value - base_size] if value - base_size < len(SPECIAL_TOKENS) else "beyond the vocabulary"
            raise CorpusError(f"{tokens.path}: token {start + index:,} is id {value}, {what} (base ids are 0..{base_size - 1}): "
                              "Linepack's special ids never occur in a prepared corpus")
        if deadline is not None and time.monotonic() > deadline:
            return start + len(piece)
    return len(tokens.array)


def manifest_tokenizer(folder: Path, manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer the manifest names, checked against its SHA-256."""
    entry = manifest["tokenizer"]
    try:
        if entry["kind"] == "char":
            tokenizer: Tokenizer = CharTokenizer(entry["vocab"])
        elif entry["kind"] == "bytes":
            tokenizer = ByteTokenizer()
        else:
            tokenizer = HFTokenizer.from_file(folder / TOKENIZER_NAME)
    except VocabularyError as error:
        raise CorpusError(f"{folder}: {error}") from None
    if tokenizer.digest != entry["sha256"] or tokenizer.vocab_size != manifest["vocab_size"]:
        raise CorpusError(f"{folder}: the tokenizer does not match the manifest (SHA-256 or vocabulary size)")
    return tokenizer


def _check_request(folder: Path, tokenizer: Tokenizer, manifest: dict[str, Any], requested_tokenizer: str | None,
                   requested_val_fraction: float | None) -> None:
    """A prepared folder fixes the tokenizer and the split: flags that ask for others are errors."""
    if requested_tokenizer is not None:
        same = requested_tokenizer == tokenizer.kind if requested_tokenizer in ("char", "bytes") else (
            tokenizer.kind == "hf" and sha256_hex(Path(requested_tokenizer).read_bytes()) == tokenizer.digest)
        if not same:
            raise CorpusError(f"{folder} was prepared with the {tokenizer.kind} tokenizer, not {requested_tokenizer!r} "
                              "(a prepared corpus fixes its tokenizer: leave --tokenizer out or prepare again)")
    prepared_fraction = manifest["split"]["val_fraction"]
    if requested_val_fraction is not None and requested_val_fraction != prepared_fraction:
        raise CorpusError(f"{folder} was prepared with --val-fraction {prepared_fraction}, not {requested_val_fraction} "
                          "(a prepared corpus fixes its split: leave --val-fraction out or prepare again)")


def open_prepared(path: str | os.PathLike, tokenizer: str | None = None, val_fraction: float | None = None) -> TokenCorpus:
    """The prepared corpus at ``path``, memory-mapped. Raises :class:`CorpusError` for a folder
    that is incomplete, damaged or prepared otherwise than ``tokenizer`` / ``val_fraction`` ask."""
    folder = Path(path)
    manifest = read_manifest(folder)
    tokens_tokenizer = manifest_tokenizer(folder, manifest)
    _check_request(folder, tokens_tokenizer, manifest, tokenizer, val_fraction)
    tokens, offsets = map_files(folder, manifest)
    check_offsets(folder, offsets, manifest["tokens"], manifest["split"])
    checked = check_ids(tokens, tokens_tokenizer.base_size, OPEN_SCAN_SECONDS)
    tokens.release()
    offsets.release()
    if checked < manifest["tokens"]:
        print(f"{folder}: the ids of the first {checked:,} of {manifest['tokens']:,} tokens checked at open "
              f"(`python -m producer prepare --verify {folder}` checks all)", file=sys.stderr)
    counts = np.asarray(manifest["unigram_counts"], dtype=np.int64)

    def release_pages() -> None:
        tokens.release()
        offsets.release()

    def check_files() -> None:
        tokens.check_size()
        offsets.check_size()

    return TokenCorpus(
        name=str(folder),
        fingerprint=manifest["fingerprint"],
        tokenizer=tokens_tokenizer,
        tokens=tokens.array,
        offsets=offsets.array,
        split_line=manifest["split"]["split_line"],
        train_counts=counts,
        release_pages=release_pages,
        mapped_bytes=tokens.size + offsets.size,
        check_files=check_files,
    )


def map_files(folder: Path, manifest: dict[str, Any]) -> tuple[MappedArray, MappedArray]:
    """The token ids and the line offsets of a checked manifest, mapped."""
    files = manifest["files"]
    tokens = MappedArray(folder / TOKENS_NAME, files[TOKENS_NAME]["dtype"], manifest["tokens"])
    offsets = MappedArray(folder / OFFSETS_NAME, files[OFFSETS_NAME]["dtype"], manifest["lines"] + 1)
    return tokens, offsets


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Checks everything of the prepared folder at ``path`` (``prepare --verify``): the manifest,
    the tokenizer, the offsets, every id, each file's size and SHA-256 and the unigram counts.
    Returns a summary; raises CorpusError naming the first problem."""
    folder = Path(path)
    manifest = read_manifest(folder)
    tokenizer = manifest_tokenizer(folder, manifest)
    tokens, offsets = map_files(folder, manifest)
    check_offsets(folder, offsets, manifest["tokens"], manifest["split"], read=True)
    check_ids(tokens, tokenizer.base_size, None)
    for mapped in (tokens, offsets):
        entry = manifest["files"][mapped.path.name]
        if entry["bytes"] != mapped.size or mapped.sha256() != entry["sha256"]:
            raise CorpusError(f"{mapped.path}: its size or SHA-256 is not the manifest's: the file was changed after prepare")
    counts = np.zeros(tokenizer.base_size, dtype=np.int64)
    for start, piece in tokens.pieces(read=True):
        piece = piece[: max(manifest["split"]["train_tokens"] - start, 0)]
        counts += np.bincount(piece, minlength=tokenizer.base_size)
    if counts.tolist() != manifest["unigram_counts"]:
        raise CorpusError(f"{folder}/{MANIFEST_NAME}: unigram_counts are not the counts of the train tokens")
    return {"lines": manifest["lines"], "tokens": manifest["tokens"], "vocab_size": manifest["vocab_size"],
            "fingerprint": manifest["fingerprint"]}
