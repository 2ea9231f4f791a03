"""Start-up: waiting for the stream and its val set, building or resuming the model, the checkpoint it
resumes from, and where the data resumes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from shared.meta import StreamMeta
from trainer.data.orders import Cursor
from trainer.data.source import Batch, BatchSource
from trainer.loop.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from trainer.loop.config import TrainConfig
from trainer.loop.observers import METRICS_NAME
from trainer.model.transformer import ModelConfig

log = logging.getLogger("trainer")

WAIT_LOG_SECONDS = 10.0


def wait_for(what: str, wait: Callable[[float], Any], timeout: float | None, why: Callable[[], str]) -> Any:
    """Calls ``wait(seconds)`` until it returns something, logging every :data:`WAIT_LOG_SECONDS`
    what it waits for and ``why()`` it has not come (and might never); TimeoutError after
    ``timeout`` seconds (None: forever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        chunk = WAIT_LOG_SECONDS if deadline is None else max(0.0, min(WAIT_LOG_SECONDS, deadline - time.monotonic()))
        result = wait(chunk)
        if result is not None:
            return result
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no {what} arrived within {timeout:.0f} s (--wait-timeout): {why()}")
        left = "" if deadline is None else f"; giving up in {deadline - time.monotonic():.0f} s (--wait-timeout)"
        log.info("waiting for the %s: %s%s", what, why(), left)


def wait_for_stream(source: BatchSource, timeout: float | None) -> StreamMeta:
    """The stream meta of ``source``, waited for as :func:`wait_for` says."""
    def meta_within(seconds: float) -> StreamMeta | None:
        try:
            return source.wait_for_meta(seconds)
        except TimeoutError:
            return None

    def why() -> str:
        return (f"no producer has announced a stream on {getattr(source, 'endpoint', 'the endpoint')} yet (start one: "
                f"python -m producer run --connect tcp://HOST:PORT; one of another stream is refused and named in this log)")

    return wait_for("stream meta", meta_within, timeout, why)


def wait_for_val_batches(source: BatchSource, timeout: float | None, limit: int | None) -> list[Batch]:
    """The first ``limit`` batches (None: all) of the fixed val set, waited for as :func:`wait_for`
    says; ValueError when the set is empty."""
    def why() -> str:
        stats = source.stats()
        return (f"{stats.val_messages_seen} of {stats.val_messages_total} val messages so far; the trainer orders them from "
                f"its producers ({len(stats.producers)} seen): a live producer sends them at once, a replay only if its "
                f"recording holds them (python -m producer record writes them; an old recording may not)")

    wait_for("val set", lambda seconds: source.wait_for_val_set(seconds) or None, timeout, why)
    batches = source.val_batches()[:limit]
    if not batches:
        raise ValueError("the stream's val set is empty: nothing to evaluate or self-test on")
    return batches


def seek_data(source: BatchSource, checkpoint: Checkpoint | None, rank: int, world: int) -> None:
    """Starts ``source``'s train schedule where ``checkpoint`` left it (its cursor), or at the start."""
    cursor = checkpoint.cursor if checkpoint is not None else None
    if cursor is None and checkpoint is not None:
        log.warning("the checkpoint holds no data cursor (written before the schedule existed): the data starts over")
    source.seek(cursor or Cursor(world=world))
    if cursor is not None:
        log.info("data resumes at train message k=%d (%d rows of it used), the cursor of step %d",
                 rank + cursor.position * cursor.world, cursor.rows_used, checkpoint.step)


def earlier_run(out_dir: str) -> str | None:
    """What of an earlier run ``out_dir`` holds (its checkpoint, its non-empty metrics.jsonl), in
    words; None when it holds neither (missing, empty, or other files only)."""
    found = [name for name in (CHECKPOINT_NAME, METRICS_NAME)
             if os.path.isfile(path := os.path.join(out_dir, name)) and os.path.getsize(path) > 0]
    return " and ".join(found) or None


def check_nothing_to_overwrite(config: TrainConfig) -> None:
    """ValueError when a run that does not resume (``--resume never``) would overwrite an earlier
    run's checkpoint or metrics in ``out_dir``: nothing is overwritten without being asked."""
    found = earlier_run(config.out_dir) if config.resume == "never" else None
    if found is not None:
        raise ValueError(f"{config.out_dir} holds an earlier run ({found}) and --resume was not given; nothing was "
                         f"overwritten: pass --resume to continue that run, or choose another --out-dir")


def checkpoint_to_resume(config: TrainConfig, path: str, device: torch.device) -> Checkpoint | None:
    """The checkpoint ``--resume`` asks for: None for ``never`` (and for ``auto`` without one);
    FileNotFoundError for ``always`` without one; ValueError for one that is unusable."""
    if config.resume == "never" or (config.resume == "auto" and not os.path.exists(path)):
        return None
    return load_checkpoint(path, device)


def model_config_for(checkpoint: Checkpoint | None, requested: ModelConfig, meta: StreamMeta) -> ModelConfig:
    """The model to build: the checkpoint's (it wins over the flags) or the requested one for this stream."""
    if checkpoint is None:
        config = requested.for_stream(meta)
    else:
        check_resumable(checkpoint.meta, meta)
        config = checkpoint.model_config
        differs = [f"{name} {getattr(config, name)} (flags: {getattr(requested, name)})"
                   for name in ("n_layer", "n_head", "n_embd", "dropout", "positions", "bias", "qk_norm", "init_std")
                   if getattr(config, name) != getattr(requested, name)]
        if differs:
            log.warning("--resume: the checkpoint's model is used, not the flags': %s", ", ".join(differs))
    config.check_covers(meta)
    return config


def check_resumable(trained_on: StreamMeta, stream: StreamMeta) -> None:
    """A checkpoint resumes only on a stream whose ids mean the same tokens."""
    differences = [d for d in trained_on.differences(stream) if d[0] in ("tokenizer", "vocab", "vocab_size", "block_size")]
    if differences:
        detail = "; ".join(f"{name}: checkpoint {mine!r:.60} vs stream {theirs!r:.60}" for name, mine, theirs in differences)
        raise ValueError(f"the checkpoint was trained on another stream ({detail})")
