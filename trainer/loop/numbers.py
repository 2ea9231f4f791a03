"""The numbers the training loop publishes to its observers, made where they are computed.

:class:`RunStart` once before the first step (what an observer may hold on to),
:class:`StepNumbers` after every optimizer step (the train loss and throughput only at log
steps), :class:`EvalNumbers` after every evaluation, :class:`RunSummary` once at the end.
Their ``record()`` is the JSON form written to ``metrics.jsonl`` and the final log line
(fields that are None are left out).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from shared.meta import StreamMeta
from trainer.data.source import Batch, BatchSource
from trainer.data.stats import StreamStats
from trainer.loop.live_samples import LiveSample


def _record(instance: Any) -> dict[str, Any]:
    return {name: value for name, value in dataclasses.asdict(instance).items() if value is not None}


@dataclass(frozen=True)
class RunStart:
    """What the loop hands its observers before the first step: the pinned ``meta``, the step
    it starts from (``step``: steps already done, > 0 on resume), the ``consumer`` it trains
    from (read-only use: its stats, cursor and histograms), the ``model`` (``eval()`` and
    forward only, under the caller's lock; None for a loop that is not Linepack's: no attention
    probe) and the fixed ``val_batches`` (the probe's inputs)."""

    meta: StreamMeta
    step: int
    consumer: BatchSource
    model: torch.nn.Module | None = None
    val_batches: list[Batch] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class StepNumbers:
    """One optimizer step. ``step`` counts the steps done; ``step_ms`` is host time (on CUDA the
    GPU may still be busy); ``data_wait_ms`` the time blocked waiting for the batch; ``tokens``
    B*T over every rank; ``step_loss`` is read every step on CPU, at log steps elsewhere.

    At log steps (``log``) also: ``train_loss`` (the optimised loss, mean over the steps since the
    last log and over ranks; 1/t-weighted under ``inverse-t``), ``train_loss_by_stage`` and
    ``train_loss_by_source`` (source name -> loss; None for a single corpus) (both unweighted),
    ``grad_norm`` (before clipping), ``ms_per_step``, ``tokens_per_s``,
    ``data_wait_fraction`` (time blocked in ``next_batch`` / wall time, 0..1), and ``val_loss`` /
    ``val_loss_by_stage`` / ``val_loss_by_source`` when the step also evaluated (plain mean
    cross-entropy).
    """

    step: int
    log: bool
    lr: float
    step_ms: float
    data_wait_ms: float
    tokens: int
    step_loss: float | None = None
    train_loss: float | None = None
    train_loss_by_stage: dict[str, float] | None = None
    train_loss_by_source: dict[str, float] | None = None
    grad_norm: float | None = None
    ms_per_step: float | None = None
    tokens_per_s: float | None = None
    data_wait_fraction: float | None = None
    val_loss: float | None = None
    val_loss_by_stage: dict[str, float] | None = None
    val_loss_by_source: dict[str, float] | None = None

    def record(self) -> dict[str, Any]:
        return _record(self)

    def with_eval(self, numbers: EvalNumbers) -> StepNumbers:
        """These numbers with the val losses of the evaluation made at this step."""
        return dataclasses.replace(self, val_loss=numbers.val_loss, val_loss_by_stage=numbers.val_loss_by_stage,
                                   val_loss_by_source=numbers.val_loss_by_source)


@dataclass(frozen=True)
class EvalNumbers:
    """One evaluation on the fixed val set (plain mean cross-entropy over supervised positions).

    ``val_loss_by_source``: source name -> its val loss, for a mixture (None for a single corpus).
    ``val_nll_bound``: the ``inverse-t`` weighted val loss, an upper bound on the NLL per token,
    for streams whose corruption allows it (else None); ``samples``: the live samples
    (``trainer.loop.live_samples``) and ``samples_ms`` what they cost (not part of ``eval_ms``).
    """

    step: int
    val_loss: float
    val_loss_by_stage: dict[str, float]
    val_supervised: int
    eval_ms: float
    before_training: bool
    val_loss_by_source: dict[str, float] | None = None
    val_nll_bound: float | None = None
    samples: list[LiveSample] | None = None
    samples_ms: float | None = None

    def record(self) -> dict[str, Any]:
        return _record(self)


@dataclass(frozen=True)
class RunSummary:
    """The end of a run: ``stopped_by`` names the exception of an interrupted run (None when it
    finished); ``world_size`` and ``parameter_digests`` (one per rank, all equal when DDP kept the
    ranks in sync) only under data-parallel training."""

    steps: int
    train_loss: float | None
    val_loss: float | None
    val_loss_by_stage: dict[str, float] | None
    wall_s: float
    stream: StreamStats | None
    val_loss_by_source: dict[str, float] | None = None
    stopped_by: str | None = None
    world_size: int | None = None
    parameter_digests: list[str] | None = None

    def record(self) -> dict[str, Any]:
        return _record(self)
