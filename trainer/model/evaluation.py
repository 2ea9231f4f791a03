"""Running the model without learning: the eval-mode context, and the loss over a set of batches.

:func:`eval_mode` is the one place the model is switched to eval mode (no dropout, no
gradients) and given back in the mode it was in; the evaluation, the attention probe, the
mask self-test and the sampler all use it. :func:`evaluate` is the mean cross-entropy over the
supervised positions of a set of batches, per stage too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from shared.limits import MAX_STAGES
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


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy in nats over ``supervised`` positions; ``by_stage``: stage id (as a
    string) -> its mean, for the stage ids present (empty when the batches carry no ``stage``);
    ``weighted``: the ``inverse-t`` weighted mean (rows weighted by ``1 / mask_ratio``), which is
    the NLL bound per token for mask-only streams with a uniform ratio (``shared.corruption.Corruption.nll_bound_unavailable``)."""

    loss: float
    supervised: int
    by_stage: dict[str, float] = field(default_factory=dict)
    weighted: float | None = None


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> EvalResult:
    """The loss of ``model`` on ``batches`` (``x``, ``y``, ``attention_mask``, optional ``stage``)."""
    loss_sum = torch.zeros(MAX_STAGES, dtype=torch.float64, device=device)
    count = torch.zeros(MAX_STAGES, dtype=torch.float64, device=device)
    has_stages = False
    weighted = torch.zeros(2, dtype=torch.float64, device=device)  # sum of w * row loss, sum of w * row count
    with eval_mode(model), autocast():
        for batch in batches:
            batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
            logits = model(batch["x"], batch["attention_mask"])
            row_loss = token_losses(logits, batch["y"]).double().sum(dim=1)
            row_count = (batch["y"] != IGNORE_INDEX).double().sum(dim=1)
            stage = batch.get("stage")
            has_stages = has_stages or stage is not None
            index = stage.long() if stage is not None else torch.zeros_like(row_count, dtype=torch.long)
            loss_sum.index_add_(0, index, row_loss)
            count.index_add_(0, index, row_count)
            if "mask_ratio" in batch:
                inverse_t = 1.0 / batch["mask_ratio"].double().clamp(min=MIN_MASK_RATIO)
                weighted += torch.stack([(inverse_t * row_loss).sum(), (inverse_t * row_count).sum()])
    loss_sum, count, weighted = loss_sum.cpu(), count.cpu(), weighted.cpu()
    total = float(count.sum())
    by_stage = {}
    if has_stages:
        by_stage = {str(s): float(loss_sum[s] / count[s]) for s in range(MAX_STAGES) if count[s] > 0}
    return EvalResult(loss=float(loss_sum.sum()) / max(total, 1.0), supervised=int(total), by_stage=by_stage,
                      weighted=float(weighted[0] / weighted[1]) if weighted[1] > 0 else None)
