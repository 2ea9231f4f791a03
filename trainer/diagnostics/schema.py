"""``GET /diagnostics``: the response schema (docs/SPEC.md §6), built from the typed numbers of
their sources, not from copies of them.

The parts come from where they are computed: :class:`shared.meta.MetaSummary`,
:class:`shared.batch_stats.BatchStats`, :class:`trainer.data.stats.StreamStats`,
:class:`trainer.diagnostics.probe.ProbeResult`, :class:`trainer.diagnostics.alarms.Alarm`;
:class:`LossNumbers` and :class:`Throughput` are the diagnostics' own. FastAPI publishes the
whole as the OpenAPI schema at ``/docs``. None means "not known yet".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from shared.batch_stats import BatchStats, CumulativePercentiles
from shared.meta import MetaSummary
from trainer.data.stats import StreamStats
from trainer.diagnostics.alarms import Alarm
from trainer.diagnostics.mixture import SourceNumbers
from trainer.diagnostics.probe import ProbeResult
from trainer.loop.live_samples import LiveSample


@dataclass
class LossNumbers:
    """Cross-entropy in nats over supervised positions; floors for the train and val stage mixes.
    ``train`` is over the last log interval (``train_step``), ``val`` over the fixed val set.
    ``val_by_source`` / ``train_by_source`` / ``context_free_floor_val_by_source``: source name ->
    its val loss / its train loss over the last log interval (unweighted) / its val floor, for a
    mixture (None for a single corpus; the losses ``{}`` before the first eval / log step)."""

    train: float | None = None
    train_step: int | None = None
    val: float | None = None
    val_step: int | None = None
    context_free_floor: float | None = None
    context_free_floor_val: float | None = None
    val_by_stage: dict[str, float] = field(default_factory=dict)
    train_by_stage: dict[str, float] = field(default_factory=dict)  # over the last log interval; empty without stages
    val_by_source: dict[str, float] | None = None
    train_by_source: dict[str, float] | None = None
    context_free_floor_val_by_source: dict[str, float] | None = None
    # The MDLM / LLaDA upper bound on the val NLL (nats per token; bits per character for a char
    # stream): the 1/t-weighted val loss of a mask-only stream with a uniform ratio over [0, 1].
    # None when the stream's corruption does not allow it, and val_nll_bound_unavailable says why.
    val_nll_bound: float | None = None
    val_nll_bound_bits_per_char: float | None = None
    val_nll_bound_unavailable: str | None = None


@dataclass(frozen=True)
class Throughput:
    """Of the last log interval: ms per step, tokens (B*T, every rank) per second, and the share
    of step time the loop waited for data."""

    ms_per_step: float | None = None
    tokens_per_s: float | None = None
    data_wait_fraction: float | None = None


@dataclass(frozen=True)
class CumulativeNumbers:
    mask_ratio: CumulativePercentiles | None = None  # over every row consumed so far


class DiagnosticsResponse(BaseModel):
    """The trainer's live state. ``status``: starting | training | finished | stopped (by a
    signal, before max_iters); ``time``: Unix seconds; ``stream.data_wait_fraction`` repeats
    ``throughput.data_wait_fraction``; ``sources``: the mix of a mixture, per source name (None
    for a single corpus)."""

    status: str
    time: float
    step: int
    meta: MetaSummary | None
    loss: LossNumbers
    batch: BatchStats | None
    cumulative: CumulativeNumbers
    attention_probe: ProbeResult | None
    stream: StreamStats | None
    throughput: Throughput
    alarms: list[Alarm]
    samples: list[LiveSample]  # the last eval's live samples (trainer.loop.live_samples)
    sources: dict[str, SourceNumbers] | None = None
