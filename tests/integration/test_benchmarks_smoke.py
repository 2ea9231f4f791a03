"""The benchmark scripts run (``--quick``) and print the JSON their docs read. Nothing is timed here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NO_TRANSFORMERS = "transformers is not installed (the benchmark-only extra: pip install '.[bench]')"


def run_quick(script: str, *extra: str, timeout: float = 60) -> dict:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *extra], capture_output=True, text=True, timeout=timeout
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)
def test_hf_collator_quick():
    report = run_quick("hf_collator.py")
    assert [p["policy"] for p in report["policies"]] == ["bert", "uniform"]
    for policy in report["policies"]:
        paths = policy["paths"]
        assert {"linepack pack+corrupt", "linepack corrupt", "hf list -> pt", "hf list -> np"} <= set(paths)
        assert all(row["M_tokens_per_s_cpu"] > 0 for row in paths.values())
        assert policy["fastest_hf_path"].startswith("hf ")
        assert policy["ratio_pack_corrupt_vs_fastest_hf"] > 0


def test_mask_cost_quick():
    report = run_quick("mask_cost.py")
    assert [row["block_size"] for row in report["results"]] == [64, 128]
    for row in report["results"]:
        for timing in ("cpu_1thread", "wall_threads"):
            assert row[timing]["masked_ms"] > 0 and row[timing]["unmasked_ms"] > 0 and row[timing]["ratio"] > 0


def test_feeding_quick():
    report = run_quick("feeding.py", "--producers", "1", "--workers", "0")
    feeds = [row["feed"] for row in report["results"]]
    assert feeds[0] == "linepack 1 producer"
    linepack = report["results"][0]
    assert linepack["batch_shape"] == [report["batch_size"], 64]
    assert linepack["stream"] == {"gaps": 0, "duplicates": 0, "rejected_total": 0}
    if HAS_TRANSFORMERS:
        assert feeds[1:] == ["dataloader num_workers=0 + hf collator"]
        assert report["results"][1]["batch_shape"] == linepack["batch_shape"]
    else:
        assert feeds[1:] == [] and "transformers" in report["skipped"]
    for row in report["results"]:
        assert row["steps_per_s"] > 0 and 0 <= row["data_wait_pct"] <= 100


def test_prepare_quick():
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "prepare.py"), "--quick"], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    paths = [row["path"] for row in report["throughput"]["rows"]]
    assert paths[:2] == ["linepack prepare --tokenizer char", "linepack prepare --tokenizer bytes"]
    assert all(row["mb_per_s"] > 0 for row in report["throughput"]["rows"])
    assert [row["corpus_mb"] for row in report["start"]] and all(row["first_message_s"] > 0 for row in report["start"])
    assert report["four_producers"]["producers"] == 4 and report["four_producers"]["messages"] > 0
    rates = {row["vocabulary"]: row for row in report["token_rates"]}
    assert rates["synthetic char 70,000"]["id_dtype"] == "uint32" and rates["char"]["id_dtype"] == "uint16"


def test_producer_mixture_table_runs(tmp_path):
    """``benchmarks/producer.py --mix``: a row per policy, every rate and the ratio positive."""
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a\n" for i in range(400)))
    (tmp_path / "b.txt").write_text("".join(f"another line {i} of b\n" for i in range(400)))
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "producer.py"), "--messages", "10", "--mix", f"a={tmp_path / 'a.txt'}:0.2",
         "--mix", f"b={tmp_path / 'b.txt'}:0.8"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    table = [line for line in completed.stdout.splitlines() if line.startswith("| ")][2:]  # after the head and its rule
    rows = [line.split("|")[1:-1] for line in table]
    assert [row[0].strip() for row in rows] == ["bert", "uniform", "stages"]
    assert all(float(cell) > 0 for row in rows for cell in row[1:])
