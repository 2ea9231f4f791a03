"""``python -m trainer.sample``: write text with a trained model, by iterative unmasking.

    python -m trainer.sample --run DIR [--num-samples 4] [--batch-size 64] [--length L] [--steps S]
                             [--strategy confidence|random] [--temperature 1] [--seed 0]
                             [--prompt TEXT | --infill TEMPLATE] [--json] [--trace FILE]

The model is the run's checkpoint (``DIR/ckpt.pt``, or ``--checkpoint FILE``), or ``DIR`` is a
folder written by ``python -m trainer.export``; it decodes with the stream meta saved in it
(characters, bytes or its tokenizers file), so no corpus is needed.
A canvas of ``L`` tokens (``[SEP]`` included; default: the typical row of the stream it trained
on) starts as ``[MASK]`` everywhere it is to be written, ``--prompt`` fixes a prefix, and
``--infill`` gives a template in which ``[MASK]`` marks one position to write and ``[MASK:N]``
N of them (``"To be, or [MASK:6] to be"``). Each of ``S`` steps (default: one position per
step) predicts every masked position and commits a scheduled number of them: the most confident
(``confidence``) or a random choice (``random``); ``--temperature 0`` takes the argmax
(``trainer.model.sampler``). Samples are computed ``--batch-size`` at a time and written as each
batch finishes, so memory stays one batch whatever ``--num-samples`` (batch ``b`` draws with
seed ``seed + b``). ``--json`` prints one JSON object (the samples as text and ids, the settings,
seconds per sample), streamed as the samples come; ``--trace FILE`` writes, per step and sample,
the positions revealed and their probabilities (JSON lines). On CUDA the model runs under bf16
autocast.

Which checkpoint (and its step) goes to stderr; so does a note when ``--steps`` is more than the
positions to write (each step writes at least one: that many steps are taken).

Exit status 2, with one line, for a run directory that does not exist or holds no checkpoint
yet, a checkpoint that does not load, a prompt longer than ``L``, text the vocabulary cannot
write, a temperature that is not a finite number >= 0, a ``[MASK:N]`` beyond the block size, or
a trace path that cannot be written (checked before sampling).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from shared import settings
from shared.meta import StreamMeta
from shared.settings import at_least, setting
from trainer.loop.checkpoint import CHECKPOINT_NAME, load_model
from trainer.loop.config import DEVICES
from trainer.loop.schedule import resolve_device
from trainer.model.exported import is_export
from trainer.model.sampler import STRATEGIES, Canvas, Sample, SamplingError, infill_canvas, prompt_canvas, sample
from trainer.model.transformer import BidirectionalTransformer


def _finite_non_negative(value: float) -> None:
    at_least(0)(value)
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")


@dataclass(frozen=True)
class SampleSettings:
    run: str | None = setting(None, "a run directory (its ckpt.pt is used)", metavar="DIR")
    checkpoint: str | None = setting(None, "a checkpoint file instead of --run", metavar="FILE")
    num_samples: int = setting(4, "samples to write", metavar="N", check=at_least(1))
    batch_size: int = setting(64, "samples computed at once (memory is one batch whatever --num-samples)", metavar="B",
                              check=at_least(1))
    length: int | None = setting(None, "tokens per sample, [SEP] included (none: a typical row of the stream)",
                                 metavar="L", check=at_least(2))
    steps: int | None = setting(None, "unmasking steps (none: one position per step)", metavar="S", check=at_least(1))
    strategy: str = setting("confidence", "which predictions each step commits: the most confident, or random ones",
                            choices=STRATEGIES)
    temperature: float = setting(1.0, "softmax temperature of the predictions; 0 = argmax", check=_finite_non_negative)
    seed: int = setting(0, "seed of every random draw", check=at_least(0))
    prompt: str | None = setting(None, "text kept fixed at the start of every sample", metavar="TEXT")
    infill: str | None = setting(None, "a template: [MASK] is one position to write, [MASK:N] N of them", metavar="TEMPLATE")
    json: bool = setting(False, "print one JSON object instead of the texts")
    trace: str | None = setting(None, "write each step's revealed positions and probabilities here (JSON lines)", metavar="FILE")
    device: str = setting("auto", "where to run the model", choices=DEVICES)


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` checked and loaded before anything is sampled."""

    model: BidirectionalTransformer
    meta: StreamMeta
    canvas: Canvas
    steps: int
    device: torch.device
    settings: dict[str, Any]


def checkpoint_path(options: SampleSettings) -> str:
    """The checkpoint to load: ``--checkpoint``, or the run directory's; FileNotFoundError saying
    plainly what is missing (the directory, or a checkpoint in it)."""
    if options.checkpoint is not None:
        if not os.path.isfile(options.checkpoint):
            raise FileNotFoundError(f"no checkpoint file {options.checkpoint}")
        return options.checkpoint
    if not os.path.isdir(options.run):
        raise FileNotFoundError(f"no run directory {options.run}")
    if is_export(options.run):
        return options.run
    path = os.path.join(options.run, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run directory {options.run} holds no checkpoint ({CHECKPOINT_NAME}) yet: a run writes one "
                                f"at every evaluation (--eval-interval) and when it is stopped")
    return path


def plan(options: SampleSettings) -> Plan:
    """Loads the model and builds the canvas; raises ValueError / SamplingError for anything unusable,
    FileNotFoundError for a missing run directory or checkpoint."""
    if (options.run is None) == (options.checkpoint is None):
        raise SamplingError("give exactly one of --run DIR and --checkpoint FILE")
    if options.prompt is not None and options.infill is not None:
        raise SamplingError("--prompt and --infill do not go together")
    path = checkpoint_path(options)
    device = resolve_device(options.device)
    trained = load_model(path, device)
    model, meta = trained.model, trained.meta
    length = options.length or trained.sample_length or meta.block_size
    if options.infill is not None:
        canvas = infill_canvas(meta, options.infill)
    else:
        canvas = prompt_canvas(meta, length, options.prompt or "")
    masked = int((~canvas.fixed).sum())
    steps = options.steps or masked
    report = {**dataclasses.asdict(options), "checkpoint": path, "length": len(canvas.ids), "steps": min(steps, masked),
              "positions_to_write": masked, "step_of_checkpoint": trained.step, "device": str(device)}
    return Plan(model, meta, canvas, steps, device, report)


def batches(run: Plan, options: SampleSettings, trace: TextIO | None) -> Iterator[Sample]:
    """Every sample, ``--batch-size`` at a time, each yielded as its batch finishes (memory is
    one batch whatever ``--num-samples``); batch ``b`` draws with seed ``seed + b``; rows are
    cut to the canvas (``sample``'s ``width``: the same samples for less compute). With
    ``trace``, each batch's steps are written to it (``sample`` numbered over all batches)."""
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if run.device.type == "cuda" else contextlib.nullcontext
    for first in range(0, options.num_samples, options.batch_size):
        count = min(options.batch_size, options.num_samples - first)
        samples = sample(run.model, run.meta, [run.canvas] * count, run.steps, options.strategy, options.temperature,
                         options.seed + first // options.batch_size, autocast, trace=trace is not None,
                         width=len(run.canvas.ids))
        for index, item in enumerate(samples, start=first):
            if trace is not None:
                for step, reveals in enumerate(item.steps):
                    trace.write(json.dumps({"sample": index, "step": step,
                                            "revealed": [dataclasses.asdict(r) for r in reveals]}) + "\n")
            yield item


def write_samples(run: Plan, options: SampleSettings, trace: TextIO | None, out: TextIO) -> None:
    """Writes the samples to ``out`` as they finish: texts, or with ``--json`` one JSON object
    (``samples``, ``settings``, ``seconds_per_sample``) streamed piece by piece."""
    started = time.perf_counter()
    if options.json:
        out.write('{"samples": [')
    for index, item in enumerate(batches(run, options, trace)):
        if options.json:
            out.write(("," if index else "") + json.dumps({"text": item.text, "ids": item.ids}))
        else:
            out.write(f"{item.text}\n{'-' * 40}\n")
        out.flush()
    if options.json:
        seconds = (time.perf_counter() - started) / options.num_samples
        out.write(f'], "settings": {json.dumps(run.settings)}, "seconds_per_sample": {json.dumps(seconds)}}}\n')


def report_plan(run: Plan, options: SampleSettings) -> None:
    """Says on stderr which checkpoint (and its step) samples, and when ``--steps`` is more than
    the positions to write (each step writes at least one: fewer steps are taken)."""
    used = run.settings
    print(f"sample: {used['checkpoint']} (step {used['step_of_checkpoint']})", file=sys.stderr)
    if options.steps is not None and options.steps > used["steps"]:
        print(f"sample: --steps {options.steps} is more than the {used['positions_to_write']} positions to write: "
              f"{used['steps']} steps, one position each", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.split("\n\n")[0])
    settings.add_arguments(parser, SampleSettings)
    try:
        options = settings.from_namespace(SampleSettings, parser.parse_args(argv))
        with contextlib.ExitStack() as files:
            trace = None if options.trace is None else files.enter_context(open_trace(options.trace))
            run = plan(options)
            report_plan(run, options)
            write_samples(run, options, trace, sys.stdout)
    except (ValueError, OSError) as error:  # SamplingError is a ValueError, as is an unusable checkpoint
        print(f"sample: {error}", file=sys.stderr)
        return 2
    return 0


def open_trace(path: str) -> TextIO:
    """The trace file, opened before anything is sampled (a folder or an unwritable path is an
    error now, not after the sampling)."""
    try:
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 - the caller closes it
    except OSError as error:
        raise OSError(f"cannot write the trace {path}: {error.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
