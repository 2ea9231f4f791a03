"""Exactly-once data with real processes on 127.0.0.1 (docs/SPEC.md §2.8): the same batches
whatever the producers do, exact epochs over several producers, exact resume after SIGKILL.

The checks are the must-show scripts themselves (``benchmarks/exactly_once.py``,
``benchmarks/epoch_check.py``) on a one-layer model and a small corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

import pytest

from helpers import ROOT

WORDS = "the quick brown fox jumps over a lazy dog and then sleeps in the warm sun".split()


def load(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """600 lines of 1-12 words, a few repeated (as real text has)."""
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(590)] + ["the end"] * 10
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_one_epoch_over_three_producers_holds_every_train_line_once(tmp_path, corpus):
    epoch_check = load("epoch_check")
    args = argparse.Namespace(
        corpus=str(corpus), producers=3, block_size=48, rows_per_message=8, seed=3, timeout=120)
    recording = tmp_path / "epoch.lps"
    epoch_check.record_one_epoch(args, recording)
    result = epoch_check.check(recording, str(corpus))
    assert result["exact"] and result["k_in_order"], result
    assert result["rows_checked"] == result["epoch_rows"] > 0 and result["lines_seen"] == result["train_lines"]

    # The check is not vacuous: against a corpus with one more train line, one line is missing.
    longer = tmp_path / "longer.txt"
    text = corpus.read_text().splitlines(keepends=True)
    longer.write_text("".join(text[:100] + ["a line no row holds\n"] + text[100:]))
    assert epoch_check.check(recording, str(longer))["missing"] >= 1


@pytest.mark.slow
def test_the_losses_are_the_same_whatever_the_producers_do_and_after_a_sigkilled_trainer_resumes(tmp_path):
    exactly_once = load("exactly_once")
    assert exactly_once.main(["--tiny", "--steps", "40", "--eval-interval", "10", "--log-interval", "5",
                              "--work", str(tmp_path), "--timeout", "120"]) == 0
