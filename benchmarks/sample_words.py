"""Does a trained model write the corpus's words? The corpus-word rate of ``trainer.sample``, trained vs untrained.

    python benchmarks/sample_words.py --run DIR --corpus FILE [--num-samples 16] [--length 128]
                                      [--steps 64] [--seed 0]

Runs ``python -m trainer.sample --run DIR --num-samples N --length L --steps S --seed SEED --json``
twice in this run of the script: on the run's checkpoint, and on an untrained model of the same
shape and stream (the checkpoint's model config, weights freshly initialised with ``--seed``,
written as a checkpoint to a temporary folder). A word is a whitespace-separated piece of a
sample's text; it counts as a corpus word when the same piece (punctuation included) occurs in
the corpus split on whitespace. Prints both rates, their ratio, seconds per sample and the first
samples, then one JSON line with every number (``ratio`` null when the untrained rate is 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.loop.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint  # noqa: E402
from trainer.model.transformer import BidirectionalTransformer  # noqa: E402


def corpus_word_rate(texts: list[str], corpus_words: set[str]) -> tuple[float, int]:
    """The share of the samples' whitespace-separated words found in ``corpus_words``, and how many words."""
    words = [word for text in texts for word in text.split()]
    return (sum(word in corpus_words for word in words) / len(words) if words else 0.0), len(words)


def sample_report(run_dir: str, options: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "trainer.sample", "--run", run_dir, "--num-samples", str(options.num_samples),
               "--length", str(options.length), "--steps", str(options.steps), "--seed", str(options.seed), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout)


def untrained_run(trained_run: str, folder: str, seed: int) -> str:
    """A run folder holding the trained checkpoint with its weights replaced by a fresh initialisation."""
    checkpoint = load_checkpoint(Path(trained_run) / CHECKPOINT_NAME)
    torch.manual_seed(seed)
    model = BidirectionalTransformer(checkpoint.model_config)
    save_checkpoint(Path(folder) / CHECKPOINT_NAME, dataclasses.replace(checkpoint, model=model.state_dict(), step=0))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the trained run directory (its ckpt.pt)")
    parser.add_argument("--corpus", required=True, help="the UTF-8 text the run trained on")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    corpus_words = set(Path(options.corpus).read_text(encoding="utf-8").split())
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, run_dir in (("trained", options.run), ("untrained", untrained_run(options.run, folder, options.seed))):
            report = sample_report(run_dir, options)
            texts = [item["text"] for item in report["samples"]]
            rate, words = corpus_word_rate(texts, corpus_words)
            results[name] = {"corpus_word_rate": rate, "words": words, "seconds_per_sample": report["seconds_per_sample"],
                             "step_of_checkpoint": report["settings"]["step_of_checkpoint"], "samples": texts}
    untrained_rate = results["untrained"]["corpus_word_rate"]
    ratio = results["trained"]["corpus_word_rate"] / untrained_rate if untrained_rate else None  # None: no untrained word was one
    print("| model | step | corpus-word rate | words | s / sample |")
    print("| --- | --- | --- | --- | --- |")
    for name, numbers in results.items():
        print(f"| {name} | {numbers['step_of_checkpoint']} | {numbers['corpus_word_rate']:.1%} | {numbers['words']} | "
              f"{numbers['seconds_per_sample']:.3f} |")
    print(f"trained / untrained: {f'{ratio:.1f}x' if ratio is not None else 'unbounded (no untrained word is a corpus word)'}")
    for name in results:
        for text in results[name]["samples"][:3]:
            print(f"--- {name}:\n{text}")
    print(json.dumps({**results, "ratio": ratio, "settings": vars(options)}))


if __name__ == "__main__":
    main()
