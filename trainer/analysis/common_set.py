"""The common held-out set of the A/B report: one line-aligned val set, recorded once, on which
every arm's final checkpoint is evaluated with the same loss, attention probe and alarm rule."""

from __future__ import annotations

from typing import Any

import torch

from shared.meta import StreamMeta
from shared.recording import RecordingReader
from shared.wire import WireError, decode_stream
from trainer.data.assembly import val_set_batches
from trainer.data.device import to_device
from trainer.diagnostics.alarms import AlarmInputs, AlarmSettings, context_blind
from trainer.diagnostics.probe import attention_probe, build_probe_set
from trainer.loop.checkpoint import load_model
from trainer.model.evaluation import evaluate

NAMES = ("x", "y", "attention_mask")


def load_val_recording(path: str, batch_size: int) -> tuple[StreamMeta, list[dict[str, torch.Tensor]]]:
    """The val messages of a recording, each val_index once, in val_index order, as batches of
    ``batch_size`` rows: ``x``, ``y``, ``attention_mask`` int64 (B, T) on the CPU."""
    messages: dict[int, Any] = {}
    meta = None
    for message in decode_stream(RecordingReader(path)):
        if isinstance(message, WireError):
            raise message
        if message.split != "val":
            continue
        if meta is not None and message.meta.digest != meta.digest:
            raise ValueError(f"{path} mixes streams: {meta.differences(message.meta)[:1]}")
        meta = message.meta
        messages.setdefault(message.val_index, message.tensors)
    if meta is None:
        raise ValueError(f"{path} holds no val messages")
    device = torch.device("cpu")
    return meta, [to_device(device, batch) for batch in val_set_batches(messages, NAMES, batch_size)]


def evaluate_on_common(arm_dir: str, common_meta: StreamMeta, common: list[dict[str, torch.Tensor]], floor: float,
                       alarm_warmup_steps: int) -> dict[str, Any]:
    """Loss, attention probe and context_blind of the arm's final model on the common set, and
    the stream meta it trained on."""
    trained = load_model(arm_dir)  # the arm's final model (eval mode, CPU)
    model, meta, step = trained.model, trained.meta, trained.step
    if meta.tokenizer_digest != common_meta.tokenizer_digest or meta.block_size < common_meta.block_size:
        raise ValueError(f"{arm_dir} was trained on another vocabulary or a shorter block than the common set")
    result = evaluate(model, common)
    probe = attention_probe(model, build_probe_set(common))
    inputs = AlarmInputs(step=step, val_loss=result.loss, floor=floor, no_context_gap=probe.loss_no_context_minus_attn)
    active, explanation = context_blind(inputs, AlarmSettings(warmup_steps=alarm_warmup_steps))
    return {"val_loss_common": result.loss, "supervised": result.supervised, "step": step, "probe": probe,
            "context_blind": {"active": active, "explanation": explanation}, "meta": meta}
