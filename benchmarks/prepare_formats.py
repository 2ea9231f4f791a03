"""``prepare`` on Parquet and zstd: peak memory and speed against the same text as ``.txt``.

    python benchmarks/prepare_formats.py [--size-mb 200] [--workers 2] [--rows-per-group 1000]
                                         [--tokenizer bytes] [--work DIR]

The text is CPython's standard library ``.py`` files repeated to ``--size-mb`` MB (as
``benchmarks/prepare.py`` makes it), cut into documents of :data:`LINES_PER_DOCUMENT` lines and
written once under ``--work`` as ``.txt``, as Parquet with small row groups (``--rows-per-group``
documents each), as Parquet in one row group (pyarrow's default size holds the whole file), and
as ``.jsonl.zst``. Each is prepared by ``python -m producer prepare --workers N`` in a child
process; the table gives its seconds, MB of text per second, and the peak RSS of the child and
its workers (polled every 50 ms; and, in a second run, their PSS, which counts a page the
workers share with it once), each as a ratio to the ``.txt`` run of the same invocation,
and checks that every run wrote the ``.txt`` run's ``tokens.npy`` and ``line_offsets.npy`` (their
SHA-256 in the manifests). Prints the table as Markdown and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import zstandard  # noqa: E402
from prepare import make_corpus, pss_kib, run_measured  # noqa: E402  (benchmarks/prepare.py)

LINES_PER_DOCUMENT = 40
WRITE_DOCUMENTS = 5000  # documents converted at a time while writing the files


def documents(text_path: Path):
    """Lists of :data:`WRITE_DOCUMENTS` documents of the text (each ends in a line break)."""
    batch, lines = [], []
    with open(text_path, encoding="utf-8", newline="") as text:  # lines as they are (no \r\n -> \n)
        for line in text:
            lines.append(line)
            if len(lines) == LINES_PER_DOCUMENT:
                batch.append("".join(lines))
                lines = []
                if len(batch) == WRITE_DOCUMENTS:
                    yield batch
                    batch = []
    yield batch + (["".join(lines)] if lines else [])


def write_parquet(text_path: Path, out: Path, rows_per_group: int | None) -> Path:
    """The documents as a Parquet file (column ``text``), row groups of ``rows_per_group`` (None: one)."""
    if out.exists():
        return out
    schema = pa.schema([("text", pa.string())])
    if rows_per_group is None:  # one row group: the whole column in one table
        table = pa.table({"text": [doc for batch in documents(text_path) for doc in batch]}, schema=schema)
        pq.write_table(table, out, row_group_size=len(table))
        return out
    with pq.ParquetWriter(out, schema) as writer:
        for batch in documents(text_path):
            writer.write_table(pa.table({"text": batch}, schema=schema), row_group_size=rows_per_group)
    return out


def write_jsonl_zst(text_path: Path, out: Path) -> Path:
    if out.exists():
        return out
    with open(out, "wb") as file, zstandard.ZstdCompressor(level=3).stream_writer(file) as stream:
        for batch in documents(text_path):
            stream.write("".join(json.dumps({"text": doc}) + "\n" for doc in batch).encode())
    return out


def measure(corpus: Path, args: argparse.Namespace, work: Path, text_mb: float) -> dict:
    out = work / f"prepared-{corpus.name}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "producer", "prepare", "--corpus", str(corpus), "--tokenizer", args.tokenizer,
            "--workers", str(args.workers), "--out", str(out)]
    if not corpus.name.endswith(".txt"):
        argv += ["--text-field", "text"]
    seconds, peak_mib = run_measured(argv)
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    _, peak_pss_mib = run_measured(argv, per_process=pss_kib)  # again, for the PSS: a page shared by the workers once
    shutil.rmtree(out)
    return {"file": corpus.name, "mb_on_disk": round(corpus.stat().st_size / 1e6, 1), "seconds": round(seconds, 2),
            "text_mb_per_s": round(text_mb / seconds, 2), "peak_rss_mib": peak_mib,
            "peak_pss_mib": peak_pss_mib,
            "files_sha256": {name: entry["sha256"] for name, entry in manifest["files"].items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows-per-group", type=int, default=1000)
    parser.add_argument("--tokenizer", default="bytes")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "linepack-formats")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    text = make_corpus(args.work, args.size_mb)
    corpora = [text, write_parquet(text, args.work / f"{text.stem}-groups{args.rows_per_group}.parquet", args.rows_per_group),
               write_parquet(text, args.work / f"{text.stem}-one-group.parquet", None),
               write_jsonl_zst(text, args.work / f"{text.stem}.jsonl.zst")]
    text_mb = text.stat().st_size / 1e6
    rows = [measure(corpus, args, args.work, text_mb) for corpus in corpora]
    base = rows[0]
    print(f"prepare --tokenizer {args.tokenizer} --workers {args.workers}, {text_mb:.0f} MB of text "
          f"({LINES_PER_DOCUMENT} lines a document)\n")
    print("| file | MB on disk | s | MB of text/s | peak RSS MiB | RSS / .txt | peak PSS MiB | PSS / .txt | time / .txt "
          "| same tokens and offsets |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        row["rss_ratio"] = round(row["peak_rss_mib"] / base["peak_rss_mib"], 2)
        row["pss_ratio"] = round(row["peak_pss_mib"] / base["peak_pss_mib"], 2)
        row["time_ratio"] = round(row["seconds"] / base["seconds"], 2)
        row["same_files"] = row["files_sha256"] == base["files_sha256"]
        cells = [row["file"], row["mb_on_disk"], row["seconds"], row["text_mb_per_s"], row["peak_rss_mib"], row["rss_ratio"],
                 row["peak_pss_mib"], row["pss_ratio"], row["time_ratio"], "yes" if row["same_files"] else "**no**"]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(json.dumps({"size_mb": args.size_mb, "workers": args.workers, "tokenizer": args.tokenizer, "rows": rows}))
    return 0 if all(row["same_files"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
