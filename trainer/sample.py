"""``python -m trainer.sample``: write text with a trained model, by iterative unmasking.

    python -m trainer.sample --run DIR [--num-samples 4] [--length L] [--steps S]
                             [--strategy confidence|random] [--temperature 1] [--seed 0]
                             [--prompt TEXT | --infill TEMPLATE] [--json] [--trace FILE]

The model is the run's checkpoint (``DIR/ckpt.pt``, or ``--checkpoint FILE``); it decodes with
the stream meta saved in it (characters, bytes or its tokenizers file), so no corpus is needed.
A canvas of ``L`` tokens (``[SEP]`` included; default: the typical row of the stream it trained
on) starts as ``[MASK]`` everywhere it is to be written, ``--prompt`` fixes a prefix, and
``--infill`` gives a template in which ``[MASK]`` marks one position to write and ``[MASK:N]``
N of them (``"To be, or [MASK:6] to be"``). Each of ``S`` steps (default: one position per
step) predicts every masked position and commits a scheduled number of them: the most confident
(``confidence``) or a random choice (``random``); ``--temperature 0`` takes the argmax
(``trainer.model.sampler``). ``--json`` prints one JSON object (the samples as text and ids, the
settings, seconds per sample); ``--trace FILE`` writes, per step and sample, the positions
revealed and their probabilities (JSON lines). On CUDA the model runs under bf16 autocast.

Which checkpoint (and its step) goes to stderr; so does a note when ``--steps`` is more than the
positions to write (each step writes at least one: that many steps are taken).

Exit status 2 for a run directory that does not exist or holds no checkpoint yet, a checkpoint
that does not load, a prompt longer than ``L``, or text the vocabulary cannot write.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from shared import settings
from shared.settings import at_least, setting
from trainer.loop.checkpoint import CHECKPOINT_NAME, load_checkpoint
from trainer.loop.config import DEVICES
from trainer.loop.schedule import resolve_device
from trainer.loop.startup import checkpoint_meta
from trainer.model.sampler import STRATEGIES, Sample, SamplingError, infill_canvas, prompt_canvas, sample
from trainer.model.transformer import BidirectionalTransformer, ModelConfig


@dataclass(frozen=True)
class SampleSettings:
    run: str | None = setting(None, "a run directory (its ckpt.pt is used)", metavar="DIR")
    checkpoint: str | None = setting(None, "a checkpoint file instead of --run", metavar="FILE")
    num_samples: int = setting(4, "samples to write (one batch)", metavar="N", check=at_least(1))
    length: int | None = setting(None, "tokens per sample, [SEP] included (none: a typical row of the stream)",
                                 metavar="L", check=at_least(2))
    steps: int | None = setting(None, "unmasking steps (none: one position per step)", metavar="S", check=at_least(1))
    strategy: str = setting("confidence", "which predictions each step commits: the most confident, or random ones",
                            choices=STRATEGIES)
    temperature: float = setting(1.0, "softmax temperature of the predictions; 0 = argmax", check=at_least(0))
    seed: int = setting(0, "seed of every random draw", check=at_least(0))
    prompt: str | None = setting(None, "text kept fixed at the start of every sample", metavar="TEXT")
    infill: str | None = setting(None, "a template: [MASK] is one position to write, [MASK:N] N of them", metavar="TEMPLATE")
    json: bool = setting(False, "print one JSON object instead of the texts")
    trace: str | None = setting(None, "write each step's revealed positions and probabilities here (JSON lines)", metavar="FILE")
    device: str = setting("auto", "where to run the model", choices=DEVICES)


def load_model(path: str, device: torch.device) -> tuple[BidirectionalTransformer, dict]:
    """The checkpoint's model (eval mode) on ``device``, and the checkpoint. ValueError when unusable."""
    checkpoint = load_checkpoint(path, device)
    model = BidirectionalTransformer(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def write_trace(path: str, samples: list[Sample]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for index, item in enumerate(samples):
            for step, reveals in enumerate(item.steps):
                file.write(json.dumps({"sample": index, "step": step, "revealed": [dataclasses.asdict(r) for r in reveals]}) + "\n")


def checkpoint_path(options: SampleSettings) -> str:
    """The checkpoint to load: ``--checkpoint``, or the run directory's; FileNotFoundError saying
    plainly what is missing (the directory, or a checkpoint in it)."""
    if options.checkpoint is not None:
        if not os.path.isfile(options.checkpoint):
            raise FileNotFoundError(f"no checkpoint file {options.checkpoint}")
        return options.checkpoint
    if not os.path.isdir(options.run):
        raise FileNotFoundError(f"no run directory {options.run}")
    path = os.path.join(options.run, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run directory {options.run} holds no checkpoint ({CHECKPOINT_NAME}) yet: a run writes one "
                                f"at every evaluation (--eval-interval) and when it is stopped")
    return path


def run(options: SampleSettings) -> dict:
    """Loads the model, writes the samples; the JSON report. Raises ValueError / SamplingError,
    FileNotFoundError for a missing run directory or checkpoint."""
    if (options.run is None) == (options.checkpoint is None):
        raise SamplingError("give exactly one of --run DIR and --checkpoint FILE")
    if options.prompt is not None and options.infill is not None:
        raise SamplingError("--prompt and --infill do not go together")
    path = checkpoint_path(options)
    device = resolve_device(options.device)
    model, checkpoint = load_model(path, device)
    meta = checkpoint_meta(checkpoint["meta"])
    length = options.length or int(checkpoint.get("sample_length") or meta.block_size)
    if options.infill is not None:
        canvas = infill_canvas(meta, options.infill)
    else:
        canvas = prompt_canvas(meta, length, options.prompt or "")
    masked = int((~canvas.fixed).sum())
    steps = options.steps or masked
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    started = time.perf_counter()
    samples = sample(model, meta, [canvas] * options.num_samples, steps, options.strategy, options.temperature,
                     options.seed, autocast, trace=options.trace is not None)
    seconds = time.perf_counter() - started
    if options.trace is not None:
        write_trace(options.trace, samples)
    return {
        "samples": [{"text": item.text, "ids": item.ids} for item in samples],
        "settings": {**dataclasses.asdict(options), "checkpoint": path, "length": len(canvas.ids), "steps": min(steps, masked),
                     "positions_to_write": masked, "step_of_checkpoint": int(checkpoint["step"]), "device": str(device)},
        "seconds_per_sample": seconds / options.num_samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.split("\n\n")[0])
    settings.add_arguments(parser, SampleSettings)
    try:
        options = settings.from_namespace(SampleSettings, parser.parse_args(argv))
        report = run(options)
    except (ValueError, FileNotFoundError) as error:  # SamplingError is a ValueError, as is an unusable checkpoint
        print(f"sample: {error}", file=sys.stderr)
        return 2
    used = report["settings"]
    print(f"sample: {used['checkpoint']} (step {used['step_of_checkpoint']})", file=sys.stderr)
    if options.steps is not None and options.steps > used["steps"]:
        print(f"sample: --steps {options.steps} is more than the {used['positions_to_write']} positions to write: "
              f"{used['steps']} steps, one position each", file=sys.stderr)
    if options.json:
        print(json.dumps(report))
    else:
        for item in report["samples"]:
            print(item["text"])
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
