"""The start-up self-test of the attention mask (docs/SPEC.md §7, §9.1).

:func:`mask_self_test` runs the real model on a real batch and checks, in eval mode with
no gradients, the two facts an inverted or ignored key-padding mask would break:

(a) changing the tokens after [SEP] (``attention_mask == 0``) leaves the logits of every
    visible position unchanged: real tokens never attend to padding;
(b) changing one visible token changes the logits of other visible positions, before and
    after it: real tokens do attend to each other, in both directions.

The logits of visible positions must also be finite: some SDPA kernels give NaN for a fully
masked row (others give zeros, which check (b) catches on rows without padding).
The trainer refuses to train when any check fails.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from shared.meta import StreamMeta
from trainer.model.evaluation import eval_mode

# Logits are compared with torch.allclose(atol=ATOL, rtol=RTOL): masked keys get exactly zero
# weight, so (a) holds to float rounding; (b) needs a change beyond the same tolerance.
ATOL = 1e-5
RTOL = 1e-4


class MaskSelfTestError(RuntimeError):
    """The model's attention does not respect the stream's attention_mask."""


class NonFiniteWeightsError(ValueError):
    """The model holds NaN or infinite weights, so no test of its attention can mean anything."""


def _changed(reference: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the logits at this position differ beyond the tolerance."""
    return ((perturbed - reference).abs() > ATOL + RTOL * reference.abs()).any(dim=-1)


def mask_self_test(model: nn.Module, batch: dict[str, torch.Tensor], meta: StreamMeta) -> dict[str, Any]:
    """Check that ``model`` attends to exactly the real tokens of ``batch``; raise otherwise.

    Args:
        model: called as ``model(x, attention_mask) -> logits (B, T, V)``.
        batch: a real batch (``x``, ``attention_mask`` (B, T) int64) on the model's device.
        meta: the stream meta (base vocabulary size for replacement tokens).
    Returns:
        a dict for the log: rows checked, rows with padding, whether check (a) was vacuous
        (no row has padding), the largest visible-logit change in (a), and the fraction of
        other visible positions whose logits changed in (b).
    Raises:
        MaskSelfTestError naming the check that failed.
    """
    broken = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if broken:
        raise NonFiniteWeightsError(f"the model's weights are not finite ({len(broken)} tensors hold NaN or inf, "
                                    f"e.g. {broken[0]}): a broken checkpoint or a diverged run, not the attention mask")
    x, attention_mask = batch["x"], batch["attention_mask"]
    visible = attention_mask == 1
    base_size = meta.base_size
    with eval_mode(model):
        reference = model(x, attention_mask).float()
        if not torch.isfinite(reference[visible]).all():
            raise MaskSelfTestError(
                "the logits of visible positions are not finite: some rows are fully masked — "
                "is the attention mask inverted (True = padding passed to SDPA)?"
            )
        max_change = _check_padding_is_unseen(model, x, attention_mask, reference, base_size)
        changed_fraction = _check_context_is_seen(model, x, attention_mask, reference, base_size)
    n_padded = int((~visible).any(dim=1).sum())
    return {
        "rows": int(x.shape[0]),
        "rows_with_padding": n_padded,
        "padding_check": "passed" if n_padded else "vacuous: no row has padding",
        "max_visible_change_from_padding": max_change,
        "other_visible_changed_fraction": changed_fraction,
    }


def _check_padding_is_unseen(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, reference: torch.Tensor,
                             base_size: int) -> float:
    """(a) Tokens after [SEP] must not reach visible positions; the largest visible-logit change."""
    visible = attention_mask == 1
    generator = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, base_size, tuple(x.shape), generator=generator).to(x.device)
    perturbed = model(torch.where(visible, x, random_ids), attention_mask).float()
    leaked = _changed(reference, perturbed) & visible
    max_change = float((perturbed - reference).abs().amax(dim=-1)[visible].max())
    if leaked.any():
        row = int(leaked.any(dim=1).nonzero()[0])
        raise MaskSelfTestError(
            f"visible logits changed when tokens after [SEP] changed (row {row}, "
            f"{int(leaked.sum())} positions, max change {max_change:.3g}): the attention mask "
            "lets real tokens attend to padding — is it inverted or ignored?"
        )
    return max_change


def _check_context_is_seen(model: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, reference: torch.Tensor,
                           base_size: int) -> float:
    """(b) One visible content token, in the middle of its row, must reach the other visible
    positions before and after it; the fraction of them whose logits changed."""
    B, T = x.shape
    visible = attention_mask == 1
    rows = torch.arange(B, device=x.device)
    probe = (visible.sum(dim=1) - 1) // 2
    one_changed = x.clone()
    one_changed[rows, probe] = (x[rows, probe].clamp(max=base_size - 1) + 1) % base_size
    perturbed = model(one_changed, attention_mask).float()
    positions = torch.arange(T, device=x.device)[None, :]
    others = visible & (positions != probe[:, None])
    reached = _changed(reference, perturbed) & others
    before = positions < probe[:, None]
    blind_after = ~(reached & ~before).any(dim=1) & (others & ~before).any(dim=1)
    blind_before = ~(reached & before).any(dim=1) & (others & before).any(dim=1)
    if (blind_after | blind_before).any():
        row = int((blind_after | blind_before).nonzero()[0])
        side = "after" if bool(blind_after[row]) else "before"
        raise MaskSelfTestError(
            f"changing the visible token at position {int(probe[row])} of row {row} did not change "
            f"the logits of any visible position {side} it: real tokens cannot see each other — "
            "is the attention mask hiding real tokens (inverted)?"
        )
    return float(reached.sum() / others.sum().clamp(min=1))
