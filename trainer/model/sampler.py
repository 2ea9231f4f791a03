"""Masked-diffusion sampling by iterative unmasking (docs/SPEC.md §7), on the rows the model trained on.

A canvas is a row of the stream's layout: the positions to generate hold ``[MASK]``, the fixed
ones (a prompt prefix, or the text around the holes of an infill template) their tokens, the
last position of the row ``[SEP]``, then ``[PAD]`` up to the block size; its attention mask is
the stream's (1 up to and including ``[SEP]``), turned into SDPA's mask by the model's own
``key_padding_mask``. At each of ``steps`` steps the model predicts every position still
masked; a scheduled number of them is committed (their count is spread evenly over the steps,
the first steps taking the remainder, so all are committed by the last step), either the most
confident (``confidence``: LLaDA's low-confidence remasking) or a random choice (``random``).
A prediction is drawn from the softmax at ``temperature`` over the base ids only (never a
special id); temperature 0 takes the argmax. Every random draw comes from one generator
seeded by ``seed``: the same seed gives the same samples.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from shared.meta import StreamMeta
from shared.tokenizer import CharTokenizer, Tokenizer
from shared.vocab import VocabularyError
from trainer.model.evaluation import eval_mode

STRATEGIES = ("confidence", "random")
# In an infill template, [MASK] is one position to generate and [MASK:N] is N of them.
HOLE = re.compile(r"\[MASK(?::(\d+))?\]")


class SamplingError(ValueError):
    """A sampling request that cannot be met: too long a prompt, text outside the vocabulary..."""


@dataclass(frozen=True)
class Canvas:
    """One row to fill: ``ids`` (L,) the content with ``[MASK]`` at the positions to generate,
    ``[SEP]`` last; ``fixed`` (L,) bool, True where a token is given (the prompt, the template)."""

    ids: torch.Tensor
    fixed: torch.Tensor


@dataclass
class Reveal:
    position: int
    token: int
    probability: float


@dataclass
class Sample:
    ids: list[int]  # the content, [SEP] excluded
    text: str
    steps: list[list[Reveal]] = field(default_factory=list)  # what each step committed


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of ``text`` (no line break added); SamplingError for characters the vocabulary lacks."""
    try:
        if isinstance(tokenizer, CharTokenizer):
            return tokenizer.encode(text).tolist()
        if tokenizer.kind == "bytes":
            return list(text.encode("utf-8"))
        return tokenizer.backend.encode(text, add_special_tokens=False).ids
    except VocabularyError as error:
        raise SamplingError(f"the prompt cannot be written in the model's vocabulary: {error}") from None


def prompt_canvas(meta: StreamMeta, length: int, prompt: str = "") -> Canvas:
    """A canvas of ``length`` tokens (``[SEP]`` included): ``prompt`` fixed at the start, the rest to generate."""
    if not 2 <= length <= meta.block_size:
        raise SamplingError(f"--length {length} is outside 2..{meta.block_size} (the block size, [SEP] included)")
    prefix = encode_text(meta.tokens, prompt)
    if len(prefix) > length - 1:
        raise SamplingError(f"the prompt is {len(prefix)} tokens; with [SEP] it does not fit --length {length}")
    ids = torch.full((length,), meta.mask_id, dtype=torch.long)
    ids[: len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    ids[-1] = meta.sep_id
    fixed = torch.zeros(length, dtype=torch.bool)
    fixed[: len(prefix)] = True
    fixed[-1] = True
    return Canvas(ids, fixed)


def infill_canvas(meta: StreamMeta, template: str) -> Canvas:
    """A canvas from a template in which ``[MASK]`` (one token) or ``[MASK:N]`` (N tokens) mark
    the positions to generate and all other text is fixed; ``[SEP]`` follows."""
    ids: list[int] = []
    fixed: list[bool] = []
    position = 0
    for hole in HOLE.finditer(template):
        text = encode_text(meta.tokens, template[position : hole.start()])
        count = int(hole.group(1) or 1)
        if not 1 <= count <= meta.block_size:
            raise SamplingError(f"{hole.group(0)[:40]} asks for {str(count)[:20]} positions: 1..{meta.block_size} "
                                "(the block size) fit")
        ids += text + [meta.mask_id] * count
        fixed += [True] * len(text) + [False] * count
        position = hole.end()
    tail = encode_text(meta.tokens, template[position:])
    ids += tail + [meta.sep_id]
    fixed += [True] * len(tail) + [True]
    if not any(not f for f in fixed):
        raise SamplingError("the infill template has no [MASK] (or [MASK:N]) to generate")
    if len(ids) > meta.block_size:
        raise SamplingError(f"the infill template is {len(ids)} tokens with [SEP]; the block size is {meta.block_size}")
    return Canvas(torch.tensor(ids, dtype=torch.long), torch.tensor(fixed, dtype=torch.bool))


def reveal_schedule(masked: int, steps: int) -> list[int]:
    """How many positions each step commits: ``masked`` spread evenly over ``min(steps, masked)``
    steps, the first ones taking the remainder (every step commits at least one)."""
    steps = max(1, min(steps, masked))
    base, extra = divmod(masked, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def _rows(canvases: list[Canvas], meta: StreamMeta, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The canvases as stream rows: ``x`` (N, width) with ``[PAD]`` after each row's ``[SEP]`` and the
    stream's ``attention_mask`` (N, width), 1 up to and including ``[SEP]``; width = the block size by default."""
    x = torch.full((len(canvases), width or meta.block_size), meta.pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(x)
    for row, canvas in enumerate(canvases):
        x[row, : len(canvas.ids)] = canvas.ids
        attention_mask[row, : len(canvas.ids)] = 1
    return x, attention_mask


def sample(model: nn.Module, meta: StreamMeta, canvases: list[Canvas], steps: int, strategy: str = "confidence",
           temperature: float = 1.0, seed: int = 0, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
           trace: bool = False, width: int | None = None) -> list[Sample]:
    """Fills ``canvases`` (one batch) by ``steps`` steps of unmasking; see the module docstring.

    ``width`` cuts the rows shorter than the block size (at least the longest canvas): the
    positions cut are ``[PAD]``, which no real position attends to, so the samples are the same
    (up to float rounding) for less compute."""
    if strategy not in STRATEGIES:
        raise SamplingError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SamplingError(f"temperature {temperature} is not a finite number >= 0")
    device = next(model.parameters()).device
    x, attention_mask = (tensor.to(device) for tensor in _rows(canvases, meta, width))
    masked = torch.zeros_like(x, dtype=torch.bool)
    for row, canvas in enumerate(canvases):
        masked[row, : len(canvas.ids)] = ~canvas.fixed.to(device)
    schedules = [reveal_schedule(int(masked[row].sum()), steps) for row in range(len(canvases))]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    history: list[list[list[Reveal]]] = [[] for _ in canvases]
    with eval_mode(model):
        for step in range(max(map(len, schedules))):
            with autocast():
                logits = model(x, attention_mask).float()
            logits[..., meta.base_size :] = float("-inf")  # only base ids are ever written
            # Draw only where something is still masked (a (rows, T, V) softmax of a large vocabulary is big).
            tokens = torch.zeros_like(x)
            confidence = torch.zeros(x.shape, device=device)
            tokens[masked], confidence[masked] = _draw(logits[masked], temperature, generator)
            for row, schedule in enumerate(schedules):
                if step >= len(schedule):
                    continue
                chosen = _choose(masked[row], confidence[row], schedule[step], strategy, generator)
                x[row, chosen] = tokens[row, chosen]
                masked[row, chosen] = False
                if trace:
                    history[row].append([Reveal(int(p), int(tokens[row, p]), float(confidence[row, p])) for p in chosen.tolist()])
    samples = []
    for row, canvas in enumerate(canvases):
        content = x[row, : len(canvas.ids) - 1].tolist()
        samples.append(Sample(content, meta.tokens.decode(content), history[row]))
    return samples


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits (K, V): a token per row, and the probability the model gave it (at temperature 1)."""
    probabilities = torch.softmax(logits, dim=-1)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        scaled = torch.softmax(logits / temperature, dim=-1).cpu()
        tokens = torch.multinomial(scaled, 1, generator=generator)[:, 0].to(logits.device)
    return tokens, probabilities.gather(-1, tokens[:, None])[:, 0]


def _choose(masked: torch.Tensor, confidence: torch.Tensor, count: int, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """Positions (indices) of ``count`` of the masked positions of one row."""
    candidates = masked.nonzero()[:, 0]
    if strategy == "random":
        order = torch.randperm(len(candidates), generator=generator)[:count].to(candidates.device)
        return candidates[order]
    return candidates[confidence[candidates].topk(count).indices]
