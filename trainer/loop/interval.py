"""The sums of one log interval: the loss of every step, the time waiting for data, and the loss
per stage and per source of a mixture, kept on the training device (no host sync per step) and
read at log steps."""

from __future__ import annotations

import dataclasses
import time

import torch

from shared.limits import MAX_SOURCES, MAX_STAGES
from shared.vocab import IGNORE_INDEX
from trainer.loop.distributed import Ranks
from trainer.loop.numbers import StepNumbers


class GroupLosses:
    """Supervised-position loss sums and counts per id of one per-row index tensor (``stage``,
    ``source``; ids below ``capacity``), float64 on the training device."""

    def __init__(self, name: str, capacity: int, device: torch.device) -> None:
        self.name = name
        self._sum = torch.zeros(capacity, dtype=torch.float64, device=device)
        self._count = torch.zeros(capacity, dtype=torch.float64, device=device)

    def add(self, ids: torch.Tensor, row_loss: torch.Tensor, row_supervised: torch.Tensor) -> None:
        """``ids``: the rows' ids (B,); ``row_loss`` / ``row_supervised``: each row's loss sum and
        supervised positions, float64 (B,)."""
        ids = ids.long()
        self._sum.index_add_(0, ids, row_loss)
        self._count.index_add_(0, ids, row_supervised)

    def take(self, ranks: Ranks) -> dict[int, float]:
        """Mean loss per id over every rank (a collective under DDP), ids with supervised
        positions only; then starts again from zero."""
        ranks.mean_(self._sum)
        ranks.mean_(self._count)
        sums, counts = self._sum.tolist(), self._count.tolist()
        self._sum.zero_()
        self._count.zero_()
        return {index: sums[index] / count for index, count in enumerate(counts) if count > 0}


class LogInterval:
    """Accumulates steps since the last log step; :meth:`close` turns them into log numbers.
    ``source_names``: a mixture's source names in meta order (empty for a single corpus; set
    once the stream's meta is known)."""

    def __init__(self, device: torch.device, ranks: Ranks) -> None:
        self.ranks = ranks
        self.source_names: tuple[str, ...] = ()
        self.last_train_loss: float | None = None
        self._loss_sum = torch.zeros((), device=device)
        self._stages = GroupLosses("stage", MAX_STAGES, device)
        self._sources = GroupLosses("source", MAX_SOURCES, device)
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

    def add_row_losses(self, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Adds a batch's loss sums and supervised counts per stage and per source, for the
        index tensors the batch carries.

        ``losses``: the step's per-position cross-entropy (B, T). Unweighted, also under
        ``inverse-t`` weighting (whose ``train_loss`` is the weighted mean): these numbers
        compare across runs.
        """
        present = [groups for groups in (self._stages, self._sources) if groups.name in batch]
        if not present:
            return
        with torch.no_grad():
            row_loss = losses.double().sum(dim=1)
            row_supervised = (batch["y"] != IGNORE_INDEX).sum(dim=1).double()
            for groups in present:
                groups.add(batch[groups.name], row_loss, row_supervised)

    def _take_source_losses(self) -> dict[str, float] | None:
        """Mean train loss per source name; None for a single corpus (no collective then)."""
        if not self.source_names:
            return None
        return {self.source_names[index]: loss for index, loss in self._sources.take(self.ranks).items()}

    def close(self, numbers: StepNumbers, grad_norm: torch.Tensor | None) -> StepNumbers:
        """``numbers`` with the interval's train loss (mean over steps and ranks; a collective),
        losses per stage and per source, gradient norm and throughput; then starts the next interval."""
        self.ranks.mean_(self._loss_sum)
        elapsed = time.perf_counter() - self._started
        train_loss = self._loss_sum.item() / self._steps
        numbers = dataclasses.replace(
            numbers,
            train_loss=train_loss,
            train_loss_by_stage={str(stage): loss for stage, loss in self._stages.take(self.ranks).items()},
            train_loss_by_source=self._take_source_losses(),
            grad_norm=None if grad_norm is None else grad_norm.item(),
            ms_per_step=1000 * elapsed / self._steps,
            tokens_per_s=numbers.tokens * self._steps / elapsed,
            data_wait_fraction=self._wait / elapsed,
        )
        self.last_train_loss = train_loss
        self.restart()
        return numbers
