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
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from producer.lines import CorpusError, TokenCorpus
from shared.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer, sha256_hex
from shared.vocab import VocabularyError

MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.npy"
OFFSETS_NAME = "line_offsets.npy"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "linepack-prepared"
FORMAT_VERSION = 1
NPY_HEADER_BYTES = 128  # a fixed-size .npy header, so the shape can be written once it is known


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder with a manifest: a prepared corpus (complete or not, :func:`open_prepared` says)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def fingerprint(manifest: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of the manifest without its fingerprint."""
    body = {key: value for key, value in manifest.items() if key != "fingerprint"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """A NumPy format 1.0 header of exactly :data:`NPY_HEADER_BYTES` bytes for a 1-D array."""
    header = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({length},), }}"
    padding = NPY_HEADER_BYTES - 10 - len(header) - 1
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER_BYTES - 10).to_bytes(2, "little") + header.encode() + b" " * padding + b"\n"


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
    """A 1-D ``.npy`` file mapped read-only: :attr:`array` reads the file's pages on demand."""

    def __init__(self, path: Path, dtype: str, length: int) -> None:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, found = read_header(file)
            offset = file.tell()
            if shape != (length,) or fortran or found != np.dtype(dtype):
                raise CorpusError(f"{path}: holds {found} {shape}, the manifest says {dtype} ({length},)")
            if os.fstat(file.fileno()).st_size != offset + length * found.itemsize:
                raise CorpusError(f"{path} has the wrong size: the folder is damaged or incomplete")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._map.madvise(mmap.MADV_RANDOM)  # rows are read at random: no read-ahead of pages nobody wants
        # Nor 2 MB at a time: a page-cache huge folio would be mapped whole at a row's first read,
        # and the resident size would follow the corpus size instead of the rows read.
        self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.array = np.frombuffer(self._map, dtype=found, count=length, offset=offset)

    def release(self) -> None:
        """Drops this process's resident pages; the page cache keeps them for the next read."""
        self._map.madvise(mmap.MADV_DONTNEED)


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CorpusError(f"{folder}: unreadable {MANIFEST_NAME} ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{folder}/{MANIFEST_NAME} is not a Linepack prepared-corpus manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"{folder}: prepared-corpus format {manifest.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    if manifest.get("fingerprint") != fingerprint(manifest):
        raise CorpusError(f"{folder}/{MANIFEST_NAME} does not match its fingerprint: it was changed after prepare")
    return manifest


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
    files = manifest["files"]
    tokens = MappedArray(folder / TOKENS_NAME, files[TOKENS_NAME]["dtype"], manifest["tokens"])
    offsets = MappedArray(folder / OFFSETS_NAME, files[OFFSETS_NAME]["dtype"], manifest["lines"] + 1)
    counts = np.asarray(manifest["unigram_counts"], dtype=np.int64)
    if counts.shape != (tokens_tokenizer.base_size,):
        raise CorpusError(f"{folder}: {len(counts)} unigram counts for {tokens_tokenizer.base_size} base ids")

    def release_pages() -> None:
        tokens.release()
        offsets.release()

    return TokenCorpus(
        name=str(folder),
        fingerprint=manifest["fingerprint"],
        tokenizer=tokens_tokenizer,
        tokens=tokens.array,
        offsets=offsets.array,
        split_line=manifest["split"]["split_line"],
        train_counts=counts,
        release_pages=release_pages,
    )
