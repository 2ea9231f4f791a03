"""Samples written at every evaluation (docs/SPEC.md §7): the same canvases each time, so a reader
sees the same prompts get better as the model learns.

The canvases are the starts of the first val rows (their original tokens, a few of them as the
prompt) continued to :attr:`LiveSampler.length` tokens, all in one batch from seed 0. Their cost
is bounded: at the first evaluation the sampler times one unmasking step and fixes the number of
steps for the run so that sampling costs at most ``budget`` (5 %) of that evaluation's time; the
rows are cut to the canvas length ([PAD] after it is never attended, so nothing changes but the cost).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from shared.meta import StreamMeta
from shared.vocab import IGNORE_INDEX
from trainer.model.sampler import Canvas, sample

PROMPT_TOKENS = 8


@dataclass(frozen=True)
class LiveSample:
    """One sample of the evaluation at ``step``: ``prompt`` fixed, ``text`` the whole sample
    (the prompt included), written in ``steps`` unmasking steps from ``seed`` (with the others
    of its evaluation, in one batch)."""

    step: int
    seed: int
    prompt: str
    text: str
    steps: int


class LiveSampler:
    def __init__(self, meta: StreamMeta, val_batches: list[dict[str, torch.Tensor]], count: int, length: int,
                 budget: float = 0.05) -> None:
        self.meta = meta
        self.budget = budget
        self.length = max(PROMPT_TOKENS + 2, min(length, meta.block_size))
        self.canvases = self._canvases(val_batches, count)
        self.steps: int | None = None  # fixed at the first run (calibrate)

    def _canvases(self, val_batches: list[dict[str, torch.Tensor]], count: int) -> list[Canvas]:
        rows = []
        for batch in val_batches:
            original = torch.where(batch["y"] != IGNORE_INDEX, batch["y"], batch["x"]).cpu()
            for row, valid in zip(original, batch["attention_mask"].sum(dim=1).tolist()):
                if len(rows) < count and valid > PROMPT_TOKENS + 1:
                    rows.append(row[:PROMPT_TOKENS])
        canvases = []
        for prompt in rows:
            ids = torch.full((self.length,), self.meta.mask_id, dtype=torch.long)
            ids[:PROMPT_TOKENS] = prompt
            ids[-1] = self.meta.sep_id
            fixed = torch.zeros(self.length, dtype=torch.bool)
            fixed[:PROMPT_TOKENS] = True
            fixed[-1] = True
            canvases.append(Canvas(ids, fixed))
        return canvases

    def calibrate(self, model: nn.Module, eval_seconds: float,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> int:
        """Fixes the steps: as many as ``budget * eval_seconds`` allows, at least 1, at most one per position."""
        started = time.perf_counter()
        sample(model, self.meta, self.canvases, 1, autocast=autocast, width=self.length)
        step_seconds = time.perf_counter() - started
        most = self.length - PROMPT_TOKENS - 1
        self.steps = max(1, min(most, int(self.budget * eval_seconds / max(step_seconds, 1e-9))))
        return self.steps

    def run(self, model: nn.Module, step: int, eval_seconds: float,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[LiveSample]:
        if not self.canvases:
            return []
        if self.steps is None:
            self.calibrate(model, eval_seconds, autocast)
        written = sample(model, self.meta, self.canvases, self.steps, seed=0, autocast=autocast, width=self.length)
        return [LiveSample(step=step, seed=0, prompt=self.meta.tokens.decode(canvas.ids[:PROMPT_TOKENS]), text=item.text,
                           steps=self.steps)
                for canvas, item in zip(self.canvases, written)]
