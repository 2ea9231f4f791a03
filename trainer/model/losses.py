"""The losses (docs/SPEC.md §7): cross-entropy over supervised positions, optionally 1/t-weighted.

:func:`token_losses` is the one place cross-entropy is computed; every mean, sum and per-stage
number (training, evaluation, the attention probe, the A/B report) is built from it, and
:func:`supervised_loss` is the training loss (the model returns logits only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.vocab import IGNORE_INDEX

LOSS_WEIGHTINGS = ("none", "inverse-t")
# inverse-t weights are 1 / max(mask_ratio, MIN_MASK_RATIO), so a row with a tiny ratio
# cannot dominate the batch (its weight is at most 1000).
MIN_MASK_RATIO = 1e-3


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy in nats, (B, T) float32; 0 where ``targets == IGNORE_INDEX``."""
    B, T, V = logits.shape
    losses = F.cross_entropy(logits.float().view(B * T, V), targets.view(B * T), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(B, T)


def supervised_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask_ratio: torch.Tensor | None = None,
    loss_weighting: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of ``logits`` (B, T, V) and what it is made of: (:func:`weighted_mean_loss`,
    a scalar; the per-position :func:`token_losses`, (B, T), for per-stage numbers)."""
    losses = token_losses(logits, targets)
    return weighted_mean_loss(losses, targets, mask_ratio, loss_weighting), losses


def weighted_mean_loss(
    losses: torch.Tensor,
    targets: torch.Tensor,
    mask_ratio: torch.Tensor | None = None,
    loss_weighting: str = "none",
) -> torch.Tensor:
    """The training loss, a scalar: a (weighted) mean over supervised positions of the
    per-position ``losses`` (B, T) of :func:`token_losses`.

    With S_b the supervised positions of row b (``targets != -100``) and l_bt the
    cross-entropy at position t:

    - ``none``:      loss = sum_b sum_{t in S_b} l_bt / sum_b |S_b|
    - ``inverse-t``: w_b = 1 / max(mask_ratio_b, 1e-3);
                     loss = sum_b w_b sum_{t in S_b} l_bt / sum_b w_b |S_b|

    so ``inverse-t`` is a weighted mean in which each supervised position of row b counts
    w_b times; with equal ratios it equals ``none``. A batch with no supervised position
    has loss 0 (and zero gradient).
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting {loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
    supervised = (targets != IGNORE_INDEX).float()
    if loss_weighting == "none":
        return losses.sum() / supervised.sum().clamp(min=1.0)
    if mask_ratio is None:
        raise ValueError("inverse-t loss weighting needs mask_ratio")
    weights = supervised / mask_ratio.float().clamp(min=MIN_MASK_RATIO)[:, None]
    return (weights * losses).sum() / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)

