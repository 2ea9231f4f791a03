"""The sums of one log interval: the loss of every step, the time waiting for data, and the
per-stage loss, kept on the training device (no host sync per step) and read at log steps."""

from __future__ import annotations

import dataclasses
import time

import torch

from shared.limits import MAX_STAGES
from shared.vocab import IGNORE_INDEX
from trainer.loop.distributed import Ranks
from trainer.loop.numbers import StepNumbers


class LogInterval:
    """Accumulates steps since the last log step; :meth:`close` turns them into log numbers."""

    def __init__(self, device: torch.device, ranks: Ranks) -> None:
        self.ranks = ranks
        self.last_train_loss: float | None = None
        self._loss_sum = torch.zeros((), device=device)
        # Per-stage supervised-position loss sums and counts (stage ids travel as uint8).
        self._stage_loss_sum = torch.zeros(MAX_STAGES, dtype=torch.float64, device=device)
        self._stage_count = torch.zeros(MAX_STAGES, dtype=torch.float64, device=device)
        self.restart()

    def restart(self) -> None:
        self._started = time.perf_counter()
        self._steps = 0
        self._wait = 0.0
        self._loss_sum.zero_()

    def add_step(self, loss: torch.Tensor, data_wait_s: float) -> None:
        self._loss_sum += loss
        self._steps += 1
        self._wait += data_wait_s

    def add_stage_losses(self, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Adds a batch's loss sums and supervised counts per stage id.

        ``losses``: the step's per-position cross-entropy (B, T). Unweighted, also under
        ``inverse-t`` weighting (whose ``train_loss`` is the weighted mean): per-stage numbers
        compare across runs.
        """
        with torch.no_grad():
            stage = batch["stage"].long()
            self._stage_loss_sum.index_add_(0, stage, losses.double().sum(dim=1))
            self._stage_count.index_add_(0, stage, (batch["y"] != IGNORE_INDEX).sum(dim=1).double())

    def _take_stage_losses(self) -> dict[str, float]:
        """Mean train loss per stage id (as a string) over every rank (a collective under DDP);
        empty without stages."""
        self.ranks.mean_(self._stage_loss_sum)
        self.ranks.mean_(self._stage_count)
        sums, counts = self._stage_loss_sum.tolist(), self._stage_count.tolist()
        self._stage_loss_sum.zero_()
        self._stage_count.zero_()
        return {str(stage): sums[stage] / count for stage, count in enumerate(counts) if count > 0}

    def close(self, numbers: StepNumbers, grad_norm: torch.Tensor | None) -> StepNumbers:
        """``numbers`` with the interval's train loss (mean over steps and ranks; a collective),
        per-stage losses, gradient norm and throughput; then starts the next interval."""
        self.ranks.mean_(self._loss_sum)
        elapsed = time.perf_counter() - self._started
        train_loss = self._loss_sum.item() / self._steps
        numbers = dataclasses.replace(
            numbers,
            train_loss=train_loss,
            train_loss_by_stage=self._take_stage_losses(),
            grad_norm=None if grad_norm is None else grad_norm.item(),
            ms_per_step=1000 * elapsed / self._steps,
            tokens_per_s=numbers.tokens * self._steps / elapsed,
            data_wait_fraction=self._wait / elapsed,
        )
        self.last_train_loss = train_loss
        self.restart()
        return numbers
