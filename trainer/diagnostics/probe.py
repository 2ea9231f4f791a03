"""Attention probe: does the model use its context, and does the mask mean what it should? (docs/SPEC.md §6)

On a fixed probe subset of the val set, in eval mode (no dropout) and without gradients:

- ``loss_attn``: the supervised cross-entropy with the real ``attention_mask``;
- ``loss_noattn``: the same with ``attention_mask`` all ones (the [PAD] tail attended too);
  ``loss_noattn_minus_attn`` is their difference;
- ``loss_no_context``: the loss when every position is hidden but the one predicted. The
  model builds its attention mask from ``attention_mask`` in one place (``key_padding_mask``),
  so for a sampled supervised position t of row b the probe feeds row b with
  ``attention_mask`` one-hot at t: position t keeps its own token and its own position but can
  attend to nothing else. Each such position costs one sequence, so only a fixed sample of
  supervised positions is used (``no_context_positions``, 256 by default), and each sequence
  is cut right after t (later positions are unattended and do not change position t).
  ``loss_attn_sampled`` is the real-mask loss at the same positions and
  ``loss_no_context_minus_attn`` the difference on those positions: near zero means the model
  does not use its context.

All losses are means in nats over supervised positions (``y != -100``), unweighted.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from shared.vocab import IGNORE_INDEX
from trainer.model.evaluation import eval_mode
from trainer.model.losses import token_losses


@dataclass(frozen=True)
class ProbeSet:
    """The fixed probe subset: ``x``, ``y``, ``attention_mask`` int64 (N, T) on the CPU, and the
    sampled supervised positions for the no-context loss as (row, position) int64 (P,) pairs."""

    x: torch.Tensor
    y: torch.Tensor
    attention_mask: torch.Tensor
    sample_rows: torch.Tensor
    sample_positions: torch.Tensor


def build_probe_set(val_batches: list[dict[str, torch.Tensor]], rows: int = 32, no_context_positions: int = 256, seed: int = 0) -> ProbeSet:
    """The first ``rows`` rows of the val set and a seeded sample of their supervised positions."""
    if not val_batches:
        raise ValueError("the probe needs a val set, and it is empty")
    take = {name: torch.cat([batch[name].cpu() for batch in val_batches])[:rows] for name in ("x", "y", "attention_mask")}
    row_index, position_index = torch.nonzero(take["y"] != IGNORE_INDEX, as_tuple=True)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(row_index), generator=generator)[:no_context_positions].sort().values
    return ProbeSet(
        x=take["x"].long(),
        y=take["y"].long(),
        attention_mask=take["attention_mask"].long(),
        sample_rows=row_index[chosen],
        sample_positions=position_index[chosen],
    )


def summed_loss(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum of cross-entropy over supervised positions, their count) for one forward pass."""
    logits = model(x, attention_mask)
    return float(token_losses(logits, y).sum()), int((y != IGNORE_INDEX).sum())


def _mean_loss(model: nn.Module, x, attention_mask, y, batch_size: int, device) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        part = slice(start, start + batch_size)
        part_total, part_count = summed_loss(model, x[part].to(device), attention_mask[part].to(device), y[part].to(device))
        total, count = total + part_total, count + part_count
    return total / max(count, 1), count


def _no_context_batch(probe: ProbeSet, chunk: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows for the sampled positions of ``chunk``: one-hot attention, labels only at the position."""
    rows, positions = probe.sample_rows[chunk], probe.sample_positions[chunk]
    length = int(positions.max()) + 1
    x = probe.x[rows, :length]
    attention_mask = torch.zeros_like(x)
    y = torch.full_like(x, IGNORE_INDEX)
    arange = torch.arange(len(rows))
    attention_mask[arange, positions] = 1
    y[arange, positions] = probe.y[rows, positions]
    return x, attention_mask, y


@dataclass(frozen=True)
class ProbeResult:
    """The probe's losses (nats, see the module docstring) on ``rows`` rows, ``positions``
    supervised positions and ``no_context_positions`` sampled ones; ``step`` and ``seconds``
    (how long it took) are set by whoever ran it."""

    loss_attn: float
    loss_noattn: float
    loss_noattn_minus_attn: float
    loss_no_context: float
    loss_attn_sampled: float
    loss_no_context_minus_attn: float
    rows: int
    positions: int
    no_context_positions: int
    step: int | None = None
    seconds: float | None = None


def attention_probe(model: nn.Module, probe: ProbeSet, batch_size: int = 32) -> ProbeResult:
    """Run the probe; the model is put in eval mode and given back in the mode it was in."""
    device = next(model.parameters()).device
    with eval_mode(model):
        loss_attn, positions = _mean_loss(model, probe.x, probe.attention_mask, probe.y, batch_size, device)
        loss_noattn, _ = _mean_loss(model, probe.x, torch.ones_like(probe.attention_mask), probe.y, batch_size, device)
        sampled_y = torch.full_like(probe.y, IGNORE_INDEX)
        sampled_y[probe.sample_rows, probe.sample_positions] = probe.y[probe.sample_rows, probe.sample_positions]
        loss_attn_sampled, sampled = _mean_loss(model, probe.x, probe.attention_mask, sampled_y, batch_size, device)
        no_context_total = 0.0
        for start in range(0, sampled, batch_size):
            x, attention_mask, y = _no_context_batch(probe, slice(start, start + batch_size))
            no_context_total += summed_loss(model, x.to(device), attention_mask.to(device), y.to(device))[0]
        loss_no_context = no_context_total / max(sampled, 1)
    return ProbeResult(
        loss_attn=loss_attn,
        loss_noattn=loss_noattn,
        loss_noattn_minus_attn=loss_noattn - loss_attn,
        loss_no_context=loss_no_context,
        loss_attn_sampled=loss_attn_sampled,
        loss_no_context_minus_attn=loss_no_context - loss_attn_sampled,
        rows=int(len(probe.x)),
        positions=positions,
        no_context_positions=sampled,
    )


class ProbeRunner:
    """When the probe runs: at the first eval, then at the first eval at least ``interval`` steps
    after the previous probe (None: every eval; 0: never). Keeps the fixed probe set."""

    def __init__(self, interval: int | None = None, rows: int = 32, no_context_positions: int = 256) -> None:
        self.interval = interval
        self.rows = rows
        self.no_context_positions = no_context_positions
        self.last_step: int | None = None
        self._probe_set: ProbeSet | None = None

    def due(self, step: int) -> bool:
        if self.interval == 0:
            return False
        return self.last_step is None or self.interval is None or step - self.last_step >= self.interval

    def run(self, model: nn.Module, val_batches: list[dict[str, torch.Tensor]], step: int) -> ProbeResult:
        """The probe on ``model`` now (the training thread: it never races the optimizer)."""
        if self._probe_set is None:
            self._probe_set = build_probe_set(val_batches, self.rows, self.no_context_positions)
        started = time.perf_counter()
        result = attention_probe(model, self._probe_set)
        self.last_step = step
        return dataclasses.replace(result, step=step, seconds=time.perf_counter() - started)
