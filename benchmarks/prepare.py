"""Real corpora: prepare throughput, producer start-up and memory on prepared corpora, token rates.

    python benchmarks/prepare.py [--sizes-mb 10,160,1000] [--throughput-mb 160] [--workers 2]
                                 [--work DIR] [--quick]

The corpus is CPython's standard library ``.py`` files concatenated, repeated to each size
(made once under ``--work``). Every number comes from one run of this script on one machine:

1. **prepare throughput** (MB of text per second, ``--workers`` processes) for ``char``, ``bytes``
   and a byte-level BPE of 8,192 tokens trained on the corpus; next to it, for the BPE, Hugging
   Face ``datasets``' ``Dataset.map(tokenize, batched=True, num_proc=workers)`` with the same
   tokenizer (the usual way users tokenize) and the tokenizer's own ``encode_batch_fast`` over
   every line in this process (the ceiling). Each prepare's peak RSS (the process and its
   workers together, polled every 50 ms) is reported too.
2. **producer start-up and memory** on prepared corpora of each size (bytes tokenizer):
   seconds from start to the first message received by a local consumer, and peak RSS
   (``VmHWM``); then 4 producers streaming from the largest for a while: their RSS summed
   (and their PSS, which counts each shared page once).
3. **producer tokens/s** at block 1024 (rows x block per second, in this process) for a char
   vocabulary of the corpus, the BPE of 8,192, and a synthetic char vocabulary of 70,000 ids
   (uint32 ids, int32 labels).

Prints the tables as Markdown and, last, one JSON line with every number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from producer.corpus import Corpus, tokenize  # noqa: E402
from producer.stream import BatchStream  # noqa: E402
from shared.data_config import DataConfig  # noqa: E402
from shared.tokenizer import HFTokenizer  # noqa: E402


def stdlib_text() -> bytes:
    """Every ``.py`` file of CPython's standard library (not site-packages), in sorted order."""
    library = Path(sysconfig.get_paths()["stdlib"])
    pieces = []
    for path in sorted(library.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        pieces.append(data if data.endswith(b"\n") else data + b"\n")
    return b"".join(pieces)


def make_corpus(work: Path, size_mb: float) -> Path:
    """``work/stdlib-SIZEmb.txt``: the standard library repeated to ``size_mb`` MB (made once)."""
    path = work / f"stdlib-{size_mb:g}mb.txt"
    if path.exists():
        return path
    text, target = stdlib_text(), int(size_mb * 1e6)
    with open(path, "wb") as file:
        written = 0
        while written < target:
            piece = text[: target - written]
            piece = piece[: piece.rfind(b"\n") + 1] or piece
            file.write(piece)
            written += len(piece)
    return path


def tree_rss_kib(pid: int, per_process=None) -> int:
    """VmRSS (or ``per_process(pid)``: :func:`pss_kib` counts a shared page once) of ``pid`` and
    all its descendants, KiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, frontier = 0, [pid]
    while frontier:
        current = frontier.pop()
        total += status_kib(current, "VmRSS") if per_process is None else per_process(current)
        frontier += children.get(current, [])
    return total


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(argv: list[str], per_process=None) -> tuple[float, int]:
    """Runs ``argv``; its wall seconds and the peak RSS (or ``per_process``, see :func:`tree_rss_kib`)
    of its process tree (MiB), polled every 50 ms."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_kib(process.pid, per_process))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{argv} failed: {process.stderr.read()[-2000:]}")
    return seconds, peak // 1024


def prepare_throughput(corpus: Path, tokenizer: str, workers: int, work: Path) -> dict:
    out = work / f"prepared-{corpus.stem}-{Path(tokenizer).stem}"
    shutil.rmtree(out, ignore_errors=True)
    seconds, peak_mib = run_measured([sys.executable, "-m", "producer", "prepare", "--corpus", str(corpus), "--tokenizer",
                                      tokenizer, "--workers", str(workers), "--out", str(out)])
    mb = corpus.stat().st_size / 1e6
    return {"path": f"linepack prepare --tokenizer {Path(tokenizer).name}", "seconds": round(seconds, 2),
            "mb_per_s": round(mb / seconds, 2), "peak_rss_mib": peak_mib, "folder": str(out)}


def datasets_map(corpus: Path, tokenizer_file: Path, workers: int, work: Path) -> dict | None:
    """``datasets``' own text loader and ``Dataset.map(batched=True, num_proc=workers)`` with the
    same tokenizer, as its documentation shows; caches in a fresh folder so nothing is reused.
    None without ``datasets`` (the ``bench`` extra)."""
    if importlib.util.find_spec("datasets") is None:
        return None
    code = f"""
import time, datasets
from tokenizers import Tokenizer
started = time.perf_counter()
tokenizer = Tokenizer.from_file({str(tokenizer_file)!r})
dataset = datasets.load_dataset("text", data_files={str(corpus)!r}, split="train", keep_linebreaks=True,
                                cache_dir={str(work / "hf-cache")!r})
def tokenize(batch):
    return {{"input_ids": [encoding.ids for encoding in tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)]}}
dataset.map(tokenize, batched=True, num_proc={workers}, remove_columns=["text"])
print(time.perf_counter() - started)
"""
    shutil.rmtree(work / "hf-cache", ignore_errors=True)
    seconds, peak_mib = run_measured([sys.executable, "-c", code])
    shutil.rmtree(work / "hf-cache", ignore_errors=True)
    mb = corpus.stat().st_size / 1e6
    return {"path": f"datasets map num_proc={workers}", "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2),
            "peak_rss_mib": peak_mib}


def encode_batch_ceiling(corpus: Path, tokenizer_file: Path) -> dict:
    """The tokenizer alone: ``encode_batch_fast`` over every line, in this process, on all cores."""
    tokenizer = HFTokenizer.from_file(tokenizer_file).backend
    text = corpus.read_text(encoding="utf-8")
    lines = [line + "\n" for line in text.split("\n")[:-1]]
    started = time.perf_counter()
    for start in range(0, len(lines), 100_000):
        tokenizer.encode_batch_fast(lines[start : start + 100_000], add_special_tokens=False)
    seconds = time.perf_counter() - started
    mb = corpus.stat().st_size / 1e6
    return {"path": "tokenizers encode_batch_fast (ceiling)", "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2),
            "peak_rss_mib": None}


def train_bpe(corpus: Path, vocab_size: int, work: Path) -> Path:
    out = work / f"bpe-{vocab_size}-{corpus.stem}.json"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "producer", "tokenizer", "train", "--corpus", str(corpus), "--vocab-size",
                        str(vocab_size), "--out", str(out)], check=True, capture_output=True)
    return out


def producer_start(prepared: Path, block_size: int = 1024) -> dict:
    """Seconds from starting ``producer run`` to its first message at a local consumer (its meta
    message), and its peak RSS after serving 50 train messages."""
    from trainer.data.consumer import DatasetConsumer

    with DatasetConsumer("tcp://127.0.0.1:*", 16) as consumer:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "producer", "run", "--connect", consumer.endpoint, "--corpus",
                                    str(prepared), "--block-size", str(block_size), "--rows-per-message", "16"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        consumer.wait_for_meta(timeout=60)
        first = time.perf_counter() - started
        for _ in range(50):
            consumer.next_batch(timeout=30)
        peak = status_kib(process.pid, "VmHWM") // 1024
        process.terminate()
        process.wait(30)
    return {"first_message_s": round(first, 2), "peak_rss_mib": peak}


def four_producers(prepared: Path, seconds: float, block_size: int = 1024) -> dict:
    """Four producers serving a consumer that drains batches from one prepared corpus for ``seconds``."""
    from trainer.data.consumer import DatasetConsumer

    consumer = DatasetConsumer("tcp://127.0.0.1:*", 16).start()
    processes = [subprocess.Popen([sys.executable, "-m", "producer", "run", "--connect", consumer.endpoint, "--corpus",
                                   str(prepared), "--block-size", str(block_size), "--rows-per-message", "16",
                                   "--producer-id", str(k)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in range(4)]
    stop = threading.Event()
    received = [0]

    def drain():
        while not stop.is_set():
            try:
                consumer.next_batch(timeout=0.1)
                received[0] += 1
            except TimeoutError:
                continue

    thread = threading.Thread(target=drain)
    thread.start()
    time.sleep(seconds)
    rss = sum(status_kib(p.pid, "VmRSS") for p in processes) // 1024
    hwm = sum(status_kib(p.pid, "VmHWM") for p in processes) // 1024
    pss = sum(pss_kib(p.pid) for p in processes) // 1024
    for process in processes:
        process.terminate()
        process.wait(30)
    stop.set()
    thread.join()
    consumer.close()
    return {"producers": 4, "seconds": seconds, "messages": received[0], "rss_sum_mib": rss, "peak_rss_sum_mib": hwm,
            "pss_sum_mib": pss}


def tokens_per_second(stream: BatchStream, messages: int) -> float:
    batches = stream.train_batches()
    next(batches)
    started = time.perf_counter()
    for _ in range(messages):
        next(batches)
    return messages * stream.config.rows_per_message * stream.config.block_size / (time.perf_counter() - started)


def synthetic_wide_corpus(ids: int = 70_000, lines: int = 20_000, seed: int = 0) -> Corpus:
    """Lines of random characters from ``ids`` distinct code points (no surrogates): V0 = ``ids``."""
    rng = np.random.default_rng(seed)
    alphabet = np.concatenate([np.arange(0x4E00, 0xD800), np.arange(0xE000, 0x30000)])[: ids - 1]
    lengths = rng.integers(5, 60, lines)
    codepoints = alphabet[rng.integers(0, len(alphabet), int(lengths.sum()))]
    ends = np.cumsum(lengths)
    with_breaks = np.insert(codepoints, ends, ord("\n"))
    text = with_breaks.astype("<u4").tobytes().decode("utf-32-le")
    text += "".join(chr(c) for c in alphabet)  # every code point at least once
    return Corpus(text + "\n", "synthetic-wide", "0" * 16)


def token_rates(corpus: Path, bpe: Path, messages: int) -> list[dict]:
    text = corpus.read_text(encoding="utf-8")[:20_000_000]
    text = text[: text.rfind("\n") + 1]
    small = Corpus(text, "stdlib", "0" * 16)
    config = DataConfig(block_size=1024, rows_per_message=16, policy="uniform")
    rows = []
    for name, tokenized in (("char", tokenize(small, "char")), ("bpe 8192", tokenize(small, HFTokenizer.from_file(bpe))),
                            ("synthetic char 70,000", tokenize(synthetic_wide_corpus(), "char"))):
        stream = BatchStream(config, corpus=tokenized)
        rows.append({"vocabulary": name, "vocab_size": stream.meta.vocab_size,
                     "id_dtype": str(next(stream.train_batches())["x"].dtype),
                     "M_tokens_per_s": round(tokens_per_second(stream, messages) / 1e6, 1)})
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="10,160,1000", help="prepared corpus sizes for start-up and memory")
    parser.add_argument("--throughput-mb", type=float, default=160.0, help="corpus size for the prepare throughput")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stream-s", type=float, default=60.0, help="how long the 4 producers stream")
    parser.add_argument("--messages", type=int, default=200, help="messages timed per token rate")
    parser.add_argument("--work", default=None, help="folder for corpora and prepared folders (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.sizes_mb, args.throughput_mb, args.stream_s, args.messages = "1,2", 1.0, 2.0, 5
    work = Path(args.work or tempfile.mkdtemp(prefix="linepack-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"workers": args.workers, "cpu_count": os.cpu_count()}

    corpus = make_corpus(work, args.throughput_mb)
    bpe = train_bpe(corpus, 8192, work)
    throughput = [prepare_throughput(corpus, kind, args.workers, work) for kind in ("char", "bytes", str(bpe))]
    mapped = datasets_map(corpus, bpe, args.workers, work)
    throughput += [row for row in (mapped, encode_batch_ceiling(corpus, bpe)) if row is not None]
    report["throughput"] = {"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "rows": throughput}
    bpe_mb_s = {row["path"]: row["mb_per_s"] for row in throughput}
    report["throughput"]["bpe_over_datasets_map"] = None if mapped is None else round(
        bpe_mb_s[f"linepack prepare --tokenizer {bpe.name}"] / mapped["mb_per_s"], 2)
    if mapped is None:
        report["skipped"] = "datasets is not installed (the bench extra: pip install '.[bench]')"
    print(f"## prepare throughput ({report['throughput']['corpus_mb']} MB corpus)\n")
    print(table(throughput, ["path", "seconds", "mb_per_s", "peak_rss_mib"]), flush=True)

    starts = []
    for size in [float(s) for s in args.sizes_mb.split(",")]:
        folder = Path(prepare_throughput(make_corpus(work, size), "bytes", args.workers, work)["folder"])
        starts.append({"corpus_mb": size, **producer_start(folder)})
    report["start"] = starts
    report["four_producers"] = {"corpus_mb": starts[-1]["corpus_mb"], **four_producers(folder, args.stream_s)}
    print("\n## producer start-up (bytes tokenizer, block 1024)\n")
    print(table(starts, ["corpus_mb", "first_message_s", "peak_rss_mib"]))
    print("\n" + table([report["four_producers"]], list(report["four_producers"])), flush=True)

    report["token_rates"] = token_rates(corpus, bpe, args.messages)
    print("\n## producer tokens/s, block 1024, uniform policy\n")
    print(table(report["token_rates"], ["vocabulary", "vocab_size", "id_dtype", "M_tokens_per_s"]))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
