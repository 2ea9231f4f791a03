"""Sampling by iterative unmasking (trainer.model.sampler, python -m trainer.sample): determinism,
fixed prompt and infill tokens, the reveal schedule, the stream layout, errors, and that a model
trained on a tiny corpus writes its lines where an untrained one does not."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.corpus import Corpus
from producer.stream import BatchStream
from shared.data_config import DataConfig
from trainer.loop.checkpoint import Checkpoint, save_checkpoint
from trainer.loop.live_samples import PROMPT_TOKENS, LiveSampler
from trainer.model import sampler
from trainer.model.losses import supervised_loss
from trainer.model.sampler import SamplingError, infill_canvas, prompt_canvas, reveal_schedule, sample
from trainer.model.transformer import BidirectionalTransformer, ModelConfig
from trainer.sample import main as sample_main

from helpers import ROOT

LINES = ["the cat sat on the mat\n", "a dog ran in the fog\n", "one fish two fish\n", "red hen, blue pen\n"]
CORPUS = Corpus("".join(LINES[i % 4] for i in range(400)), "tiny", "0" * 16)
BLOCK = 48


def tiny_stream(**overrides) -> BatchStream:
    config = DataConfig(block_size=BLOCK, rows_per_message=16, policy="uniform", mask_fractions=(1.0, 0.0, 0.0),
                        val_fraction=0.05, **overrides)
    return BatchStream(config, corpus=CORPUS)


def tiny_model(meta, seed: int = 0) -> BidirectionalTransformer:
    """Learned positions: an all-[MASK] canvas of the four-line corpus is a question of absolute
    position, which 200 steps teach learned positions and not yet rotary ones."""
    torch.manual_seed(seed)
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, dropout=0.0, positions="learned").for_stream(meta)
    return BidirectionalTransformer(config).eval()


def batch_tensors(batch) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(batch[name].astype(np.int64)) for name in ("x", "attention_mask", "y"))


@pytest.fixture(scope="module")
def trained():
    """A small model trained 200 steps on the four lines (mask-only uniform corruption)."""
    stream = tiny_stream()
    model = tiny_model(stream.meta).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in islice(stream.train_batches(), 200):
        x, attention_mask, y = batch_tensors(batch)
        loss, _ = supervised_loss(model(x, attention_mask), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return stream.meta, model.eval()


def corpus_line_rate(texts: list[str]) -> float:
    """The fraction of the complete lines written (all but a cut last one) that are corpus lines."""
    lines = [line + "\n" for text in texts for line in text.split("\n")[:-1]]
    return sum(line in LINES for line in lines) / max(len(lines), 1)


# ---- the canvas and the schedule ---------------------------------------------------------------


@given(st.integers(1, 500), st.integers(1, 600))
@settings(max_examples=300, deadline=None)
def test_the_schedule_commits_everything_by_the_last_step(masked, steps):
    schedule = reveal_schedule(masked, steps)
    assert sum(schedule) == masked and len(schedule) == min(masked, steps)
    assert min(schedule) >= 1 and max(schedule) - min(schedule) <= 1 and schedule == sorted(schedule, reverse=True)


def test_a_prompt_canvas_has_the_stream_layout():
    meta = tiny_stream().meta
    canvas = prompt_canvas(meta, 20, "the cat")
    assert canvas.ids[:7].tolist() == meta.tokens.encode("the cat").tolist()
    assert (canvas.ids[7:19] == meta.mask_id).all() and canvas.ids[19] == meta.sep_id
    assert canvas.fixed.tolist() == [True] * 7 + [False] * 12 + [True]
    x, attention_mask = sampler._rows([canvas], meta, None)
    assert x.shape == (1, BLOCK) and (x[0, 20:] == meta.pad_id).all()
    assert attention_mask[0].tolist() == [1] * 20 + [0] * (BLOCK - 20), "1 up to and including [SEP], as the stream"


def test_infill_templates():
    meta = tiny_stream().meta
    canvas = infill_canvas(meta, "the [MASK:3] sat[MASK]on")
    encode = meta.tokens.encode
    assert canvas.ids.tolist() == [*encode("the "), *[meta.mask_id] * 3, *encode(" sat"), meta.mask_id, *encode("on"),
                                   meta.sep_id]
    assert (~canvas.fixed).sum() == 4
    with pytest.raises(SamplingError, match="no \\[MASK\\]"):
        infill_canvas(meta, "nothing to write")
    with pytest.raises(SamplingError, match="block size"):
        infill_canvas(meta, "[MASK:60]")


def test_errors_are_sampling_errors():
    meta = tiny_stream().meta
    with pytest.raises(SamplingError, match="does not fit --length 5"):
        prompt_canvas(meta, 5, "the cat sat")
    with pytest.raises(SamplingError, match="outside 2..48"):
        prompt_canvas(meta, 49)
    with pytest.raises(SamplingError, match="vocabulary"):
        prompt_canvas(meta, 20, "ZZZ")
    model = tiny_model(meta)
    with pytest.raises(SamplingError, match="strategy"):
        sample(model, meta, [prompt_canvas(meta, 10)], 2, strategy="greedy")


# ---- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["confidence", "random"])
def test_the_same_seed_gives_the_same_samples(strategy):
    meta = tiny_stream().meta
    model = tiny_model(meta)
    canvases = [prompt_canvas(meta, 30, "the")] * 4
    first = sample(model, meta, canvases, 8, strategy, temperature=1.0, seed=3)
    again = sample(model, meta, canvases, 8, strategy, temperature=1.0, seed=3)
    other = sample(model, meta, canvases, 8, strategy, temperature=1.0, seed=4)
    assert [s.ids for s in first] == [s.ids for s in again]
    assert [s.ids for s in first] != [s.ids for s in other]
    assert len({tuple(s.ids) for s in first}) > 1, "the rows of a batch draw differently"


@pytest.mark.parametrize("strategy", ["confidence", "random"])
def test_fixed_tokens_never_change_and_one_position_per_step_when_steps_equal_positions(strategy):
    meta = tiny_stream().meta
    model = tiny_model(meta)
    for canvas in (prompt_canvas(meta, 26, "one fish"), infill_canvas(meta, "a [MASK:5] ran [MASK:4] fog")):
        masked = int((~canvas.fixed).sum())
        samples = sample(model, meta, [canvas] * 3, masked, strategy, seed=1, trace=True)
        for item in samples:
            ids = torch.tensor(item.ids)
            fixed = canvas.fixed[:-1]
            assert torch.equal(ids[fixed], canvas.ids[:-1][fixed]), "prompt and template tokens are kept"
            assert [len(step) for step in item.steps] == [1] * masked, "S = L: one position revealed per step"
            revealed = [reveal.position for step in item.steps for reveal in step]
            assert sorted(revealed) == torch.nonzero(~canvas.fixed).flatten().tolist(), "each hole exactly once"
            assert all(0 < reveal.probability <= 1 for step in item.steps for reveal in step)


def test_fewer_steps_reveal_several_positions_and_the_text_holds_no_specials():
    meta = tiny_stream().meta
    model = tiny_model(meta)
    samples = sample(model, meta, [prompt_canvas(meta, BLOCK)] * 4, 5, trace=True, temperature=1.0)
    for item in samples:
        assert [len(step) for step in item.steps] == reveal_schedule(BLOCK - 1, 5)
        assert max(item.ids) < meta.base_size and len(item.ids) == BLOCK - 1
        assert "[MASK]" not in item.text and "[PAD]" not in item.text and "[SEP]" not in item.text
        assert item.text == meta.tokens.decode(item.ids)


def test_temperature_zero_is_the_argmax_and_needs_no_seed():
    meta = tiny_stream().meta
    model = tiny_model(meta)
    canvases = [prompt_canvas(meta, 20, "the")] * 2
    first = sample(model, meta, canvases, 19, temperature=0.0, seed=1)
    other = sample(model, meta, canvases, 19, temperature=0.0, seed=2)
    assert first[0].ids == first[1].ids == other[0].ids


def test_cutting_the_width_changes_nothing():
    """[PAD] after [SEP] is never attended, so rows cut to the canvas give the same samples."""
    meta = tiny_stream().meta
    model = tiny_model(meta)
    canvases = [prompt_canvas(meta, 20, "red")] * 3
    full = sample(model, meta, canvases, 6, temperature=0.0)
    cut = sample(model, meta, canvases, 6, temperature=0.0, width=20)
    assert [s.ids for s in full] == [s.ids for s in cut]


def test_a_trained_model_writes_the_corpus_lines_and_an_untrained_one_does_not(trained):
    meta, model = trained
    canvases = [prompt_canvas(meta, 45)] * 16
    written = sample(model, meta, canvases, 44, "confidence", temperature=0.0, seed=0)
    untrained = sample(tiny_model(meta, seed=1), meta, canvases, 44, "confidence", temperature=1.0, seed=0)
    trained_rate, random_rate = corpus_line_rate([s.text for s in written]), corpus_line_rate([s.text for s in untrained])
    assert trained_rate >= 0.75, [s.text for s in written]
    assert random_rate <= 0.1, [s.text for s in untrained]


def test_live_samples_keep_their_canvases_and_bound_their_steps(trained):
    meta, model = trained
    val = [dict(zip(("x", "attention_mask", "y"), batch_tensors(batch))) for batch in tiny_stream().val_set()]
    live = LiveSampler(meta, val, count=2, length=30, budget=0.05)
    assert len(live.canvases) == 2 and all(len(c.ids) == 30 for c in live.canvases)
    first = live.run(model, step=10, eval_seconds=0.0)  # no time at all: one step
    assert live.steps == 1 and [s.step for s in first] == [10, 10]
    again = live.run(model, step=20, eval_seconds=100.0)
    assert live.steps == 1, "calibrated once, at the first evaluation"
    assert [s.prompt for s in first] == [s.prompt for s in again] and [s.text for s in first] == [s.text for s in again]
    for item in first:
        assert item.text.startswith(item.prompt) and len(meta.tokens.encode(item.prompt)) == PROMPT_TOKENS
    generous = LiveSampler(meta, val, count=2, length=30, budget=0.05)
    assert generous.calibrate(model, eval_seconds=1e6) == 30 - PROMPT_TOKENS - 1, "at most one position per step"


# ---- the CLI -----------------------------------------------------------------------------------


def save_run(directory, meta, model) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / "ckpt.pt", Checkpoint(model=model.state_dict(), optimizer={}, step=200,
                                                      model_config=model.config, meta=meta, sample_length=30))


def sample_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.sample", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_cli_writes_json_and_a_trace(trained, tmp_path):
    meta, model = trained
    save_run(tmp_path / "run", meta, model)
    trace = tmp_path / "trace.jsonl"
    done = sample_cli("--run", tmp_path / "run", "--num-samples", 3, "--steps", 7, "--seed", 5, "--prompt", "one",
                      "--json", "--trace", trace, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["samples"]) == 3 and all(s["text"].startswith("one") for s in report["samples"])
    assert report["settings"]["length"] == 30 and report["settings"]["steps"] == 7, "the length saved with the run"
    assert report["settings"]["step_of_checkpoint"] == 200 and report["seconds_per_sample"] > 0
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(steps) == 3 * 7 and sum(len(s["revealed"]) for s in steps if s["sample"] == 0) == 30 - 3 - 1
    again = sample_cli("--run", tmp_path / "run", "--num-samples", 3, "--steps", 7, "--seed", 5, "--prompt", "one",
                       "--json", "--device", "cpu")
    assert json.loads(again.stdout)["samples"] == report["samples"]
    text = sample_cli("--run", tmp_path / "run", "--num-samples", 1, "--infill", "red [MASK:3], blue pen", "--device", "cpu")
    assert text.returncode == 0 and text.stdout.startswith("red ") and "blue pen" in text.stdout
    assert f"sample: {tmp_path / 'run' / 'ckpt.pt'} (step 200)" in text.stderr and "--steps" not in text.stderr


def test_more_steps_than_positions_to_write_says_so(trained, tmp_path, capsys):
    meta, model = trained
    save_run(tmp_path / "run", meta, model)
    code = sample_main(["--run", str(tmp_path / "run"), "--num-samples", "1", "--infill", "red [MASK:3], blue pen",
                        "--steps", "8", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["settings"]["steps"] == 3
    assert "--steps 8 is more than the 3 positions to write: 3 steps, one position each" in captured.err


def test_the_corpus_word_benchmark_tells_a_trained_model_from_an_untrained_one(trained, tmp_path):
    """benchmarks/sample_words.py (the issue's must-show): the trained run against a fresh model of its shape."""
    meta, model = trained
    save_run(tmp_path / "run", meta, model)
    (tmp_path / "corpus.txt").write_text(CORPUS.text, encoding="utf-8")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sample_words.py"), "--run", tmp_path / "run",
                           "--corpus", tmp_path / "corpus.txt", "--num-samples", "4", "--length", "30", "--steps", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    trained_run, untrained_run = report["trained"], report["untrained"]
    assert trained_run["step_of_checkpoint"] == 200 and untrained_run["step_of_checkpoint"] == 0
    assert trained_run["words"] > 0 and len(trained_run["samples"]) == 4
    assert trained_run["corpus_word_rate"] > max(3 * untrained_run["corpus_word_rate"], 0.05), report


@pytest.mark.parametrize("case", ["no run directory", "no checkpoint", "no checkpoint file", "damaged checkpoint",
                                  "prompt too long", "outside the vocabulary", "both prompt and infill",
                                  "temperature nan", "temperature inf", "huge hole", "trace is a folder"])
def test_cli_errors_exit_2_with_a_clear_line(trained, tmp_path, case, capsys):
    meta, model = trained
    save_run(tmp_path / "run", meta, model)
    args = ["--run", tmp_path / "run", "--device", "cpu"]
    if case == "no run directory":
        args, expected = ["--run", tmp_path / "nowhere"], f"sample: no run directory {tmp_path / 'nowhere'}"
    elif case == "no checkpoint":
        (tmp_path / "empty").mkdir()
        args, expected = ["--run", tmp_path / "empty"], f"run directory {tmp_path / 'empty'} holds no checkpoint (ckpt.pt) yet"
    elif case == "no checkpoint file":
        args, expected = ["--checkpoint", tmp_path / "x.pt"], f"sample: no checkpoint file {tmp_path / 'x.pt'}"
    elif case == "damaged checkpoint":
        data = bytearray((tmp_path / "run" / "ckpt.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / "run" / "ckpt.pt").write_bytes(bytes(data))
        expected = "unusable checkpoint"
    elif case == "prompt too long":
        args, expected = [*args, "--length", 5, "--prompt", "the cat sat"], "does not fit"
    elif case == "outside the vocabulary":
        args, expected = [*args, "--prompt", "ZZZ"], "vocabulary"
    elif case == "both prompt and infill":
        args, expected = [*args, "--prompt", "a", "--infill", "[MASK]"], "do not go together"
    elif case.startswith("temperature"):  # issue 26 item 9: a traceback (exit 1) before
        args, expected = [*args, "--temperature", case.split()[1]], "is not a finite number"
    elif case == "huge hole":
        args, expected = [*args, "--infill", "a [MASK:99999999999999999999] b"], "asks for 99999999999999999999 positions"
    else:
        (tmp_path / "folder").mkdir()
        args, expected = [*args, "--trace", tmp_path / "folder"], f"cannot write the trace {tmp_path / 'folder'}"
    try:
        code = sample_main([str(arg) for arg in args])
    except SystemExit as usage:  # a bad flag value is a usage error: exit 2 from argparse
        code = usage.code
    output = capsys.readouterr()
    assert code == 2 and expected in output.err.strip().splitlines()[-1], output.err  # the last line says why
    assert output.out == "" and "Traceback" not in output.err and "nothing to resume" not in output.err


def test_samples_come_in_batches_and_stream_out_with_bounded_memory(trained, tmp_path):
    """Issue 26 item 8: --num-samples 10000000 --length 8 reached 10.9 GB in one batch. Now the
    first samples are out within seconds, and RSS stays flat while batches go by."""
    import os

    meta, model = trained
    save_run(tmp_path / "run", meta, model)
    command = [sys.executable, "-m", "trainer.sample", "--run", tmp_path / "run", "--num-samples", 10_000_000,
               "--length", 8, "--batch-size", 256, "--device", "cpu", "--json"]
    process = subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    def peak_kib() -> int:
        with open(f"/proc/{process.pid}/status") as status:
            return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

    try:
        first = process.stdout.read(4000)  # arrives long before 10M samples could be done
        assert first.startswith(b'{"samples": [{"text": ') and first.count(b'"ids"') >= 10
        peaks = []
        for _ in range(5):
            process.stdout.read(40_000)  # keep it writing: a few batches each time
            peaks.append(peak_kib())
        assert peaks[-1] - peaks[0] < 32 * 1024 and peaks[-1] < 2 * 1024 * 1024, peaks
    finally:
        process.kill()
        process.wait(10)


def test_batches_of_the_cli_give_the_samples_of_sample_with_each_batchs_seed(trained, tmp_path):
    meta, model = trained
    save_run(tmp_path / "run", meta, model)
    trace = tmp_path / "trace.jsonl"
    done = sample_cli("--run", tmp_path / "run", "--num-samples", 5, "--batch-size", 2, "--length", 12, "--seed", 3,
                      "--json", "--trace", trace, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    texts = [item["text"] for item in json.loads(done.stdout)["samples"]]
    canvas = prompt_canvas(meta, 12)
    expected = [item.text for b, count in enumerate((2, 2, 1)) for item in sample(model, meta, [canvas] * count, 11, seed=3 + b, width=12)]
    assert texts == expected
    assert sorted({json.loads(line)["sample"] for line in trace.read_text().splitlines()}) == [0, 1, 2, 3, 4]
