"""Running the model without learning: the eval-mode context, and the loss over a set of batches.

:func:`eval_mode` is the one place the model is switched to eval mode (no dropout, no
gradients) and given back in the mode it was in; the evaluation, the attention probe, the
mask self-test and the sampler all use it. :func:`evaluate` is the mean cross-entropy over the
supervised positions of a set of batches, per stage and per source of a mixture too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from shared.limits import MAX_SOURCES, MAX_STAGES
from shared.vocab import IGNORE_INDEX
from trainer.model.losses import MIN_MASK_RATIO, token_losses


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``torch.no_grad()``; its previous mode comes back on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# The row tensors a loss is also split by, and how many ids each can take.
ROW_GROUPS = {"stage": MAX_STAGES, "source": MAX_SOURCES}


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy in nats over ``supervised`` positions; ``by_stage``: stage id (as a
    string) -> its mean, for the stage ids present (empty when the batches carry no ``stage``);
    ``by_source``: the same per source of a mixture, by name where names were given, else by
    index (empty without ``source``);
    ``weighted``: the ``inverse-t`` weighted mean (rows weighted by ``1 / mask_ratio``), which is
    the NLL bound per token for mask-only streams with a uniform ratio (``shared.corruption.Corruption.nll_bound_unavailable``)."""

    loss: float
    supervised: int
    by_stage: dict[str, float] = field(default_factory=dict)
    by_source: dict[str, float] = field(default_factory=dict)
    weighted: float | None = None


def group_means(sums: torch.Tensor) -> dict[str, float]:
    """``sums`` (2, N): loss sums and supervised counts per id -> id (as a string) -> mean, for the ids with a count."""
    losses, counts = sums.tolist()
    return {str(index): losses[index] / count for index, count in enumerate(counts) if count > 0}


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    source_names: Sequence[str] = (),
) -> EvalResult:
    """The loss of ``model`` on ``batches`` (``x``, ``y``, ``attention_mask``, optional ``stage``,
    ``source``); ``source_names``: the name of each source id (a mixture's, in meta order)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, supervised count
    grouped = {name: torch.zeros((2, size), dtype=torch.float64, device=device) for name, size in ROW_GROUPS.items()}
    present: set[str] = set()
    weighted = torch.zeros(2, dtype=torch.float64, device=device)  # sum of w * row loss, sum of w * row count
    with eval_mode(model), autocast():
        for batch in batches:
            batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
            logits = model(batch["x"], batch["attention_mask"])
            rows = torch.stack([token_losses(logits, batch["y"]).double().sum(dim=1),
                                (batch["y"] != IGNORE_INDEX).double().sum(dim=1)])  # (2, B)
            total += rows.sum(dim=1)
            for name, sums in grouped.items():
                if name in batch:
                    present.add(name)
                    sums.index_add_(1, batch[name].long(), rows)
            if "mask_ratio" in batch:
                inverse_t = 1.0 / batch["mask_ratio"].double().clamp(min=MIN_MASK_RATIO)
                weighted += rows @ inverse_t
    (loss_sum, count), weighted = total.tolist(), weighted.cpu()
    by_group = {name: group_means(sums.cpu()) if name in present else {} for name, sums in grouped.items()}
    by_source = {source_names[int(index)] if source_names else index: loss for index, loss in by_group["source"].items()}
    return EvalResult(loss=loss_sum / max(count, 1.0), supervised=int(count), by_stage=by_group["stage"],
                      by_source=by_source, weighted=float(weighted[0] / weighted[1]) if weighted[1] > 0 else None)
