"""Mixtures on the trainer side: the val loss and floor per source, the mix per source, its alarm,
and what /diagnostics, /metrics, /history and metrics.jsonl show (and do not show for one corpus)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trainer.model.evaluation import evaluate

VOCAB = 4


class RowScaleModel(nn.Module):
    """Logits ``x`` on class 0 and 0 elsewhere: a position with ``y = 0`` costs ``log(1 + (V-1) e^-x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, attention_mask):
        logits = torch.zeros((*x.shape, VOCAB))
        logits[..., 0] = x.float()
        return logits, None


def position_loss(x: float) -> float:
    return math.log(1 + (VOCAB - 1) * math.exp(-x))


def hand_made_batch(scales, supervised, sources, stages=None):
    """One row per entry: every position of row r has input ``scales[r]``, its first
    ``supervised[r]`` positions are supervised with target 0."""
    rows, length = len(scales), 6
    x = torch.tensor(scales, dtype=torch.int64)[:, None].expand(rows, length).clone()
    y = torch.full((rows, length), -100, dtype=torch.int64)
    for row, count in enumerate(supervised):
        y[row, :count] = 0
    batch = {"x": x, "y": y, "attention_mask": torch.ones_like(x), "mask_ratio": torch.full((rows,), 0.5),
             "source": torch.tensor(sources, dtype=torch.int64)}
    if stages is not None:
        batch["stage"] = torch.tensor(stages, dtype=torch.int64)
    return batch


def test_val_loss_per_source_is_the_mean_over_that_sources_rows_only():
    batches = [hand_made_batch([0, 1, 2, 3], [1, 2, 3, 4], [0, 1, 0, 2], stages=[0, 0, 1, 1]),
               hand_made_batch([4, 5], [5, 6], [2, 0], stages=[1, 0])]
    rows = [(0, 1, 0, 0), (1, 2, 1, 0), (2, 3, 0, 1), (3, 4, 2, 1), (4, 5, 2, 1), (5, 6, 0, 0)]  # scale, supervised, source, stage

    def mean(selected):
        return sum(position_loss(s) * n for s, n, *_ in selected) / sum(n for _, n, *_ in selected)

    result = evaluate(RowScaleModel(), batches)
    assert result.by_source == pytest.approx({str(k): mean([r for r in rows if r[2] == k]) for k in (0, 1, 2)}, rel=1e-6)
    assert result.by_stage == pytest.approx({str(k): mean([r for r in rows if r[3] == k]) for k in (0, 1)}, rel=1e-6)
    assert result.loss == pytest.approx(mean(rows), rel=1e-6) and result.supervised == 21
    without = evaluate(RowScaleModel(), [{k: v for k, v in b.items() if k not in ("source", "stage")} for b in batches])
    assert without.by_source == {} and without.by_stage == {} and without.loss == pytest.approx(result.loss, rel=1e-12)
