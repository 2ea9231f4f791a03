"""The training loop (SPEC §7): stream meta -> model -> mask self-test -> AdamW steps.

:class:`Trainer` pulls batches from a consumer (``trainer.consumer.DatasetConsumer`` or
anything with the same methods), builds the model from the stream meta, refuses to train
when :func:`trainer.selftest.mask_self_test` fails, then runs AdamW with linear warm-up and
cosine decay, gradient clipping and bf16 autocast on CUDA. It evaluates on the fixed val
set and writes an atomic checkpoint every ``eval_interval`` steps, and publishes its
numbers to observers:

    on_start(trainer)        once, after the self-test, before the first step
    on_step(step, numbers)   after every optimizer step (``step`` = steps done so far)
    on_eval(step, numbers)   after every evaluation
    on_end(summary)          once, after the last step

Per-step numbers: ``lr``, ``step_ms`` (host time; on CUDA the GPU may still be busy),
``data_wait_ms`` (blocked in ``next_batch``), ``tokens`` (B*T) and
``step_loss`` (read from the device every step on CPU, only at log steps elsewhere). At
log steps (``numbers["log"]``) also ``train_loss`` (mean over the steps since the last
log), ``grad_norm``, ``ms_per_step``, ``tokens_per_s``, ``data_wait_pct`` (time blocked in
``next_batch`` / wall time), and ``val_loss`` when the step also evaluated. ``train_loss``
is the optimised loss (weighted when ``loss_weighting`` is ``inverse-t``); val losses are
always the plain mean cross-entropy over supervised positions.

Data-parallel (``ranks``, a :class:`trainer.distributed.Ranks` from torchrun): every rank
trains a ``DistributedDataParallel`` copy on its own consumer's batches; only rank 0 evaluates,
checkpoints and has observers. ``tokens`` and ``tokens_per_s`` then count every rank's batch,
``train_loss`` is the mean over the ranks, and ``step_loss`` is this rank's own. Every rank
takes part in the collectives at log steps (loss mean, stream stats gather) and at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Protocol

import torch

from shared.meta import StreamMeta
from shared.vocab import IGNORE_INDEX
from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.distributed import Ranks, parameter_digest
from trainer.model import LOSS_WEIGHTINGS, BidirectionalTransformer, ModelConfig, token_losses, weighted_mean_loss
from trainer.selftest import mask_self_test

log = logging.getLogger("trainer")

METRICS_NAME = "metrics.jsonl"
WAIT_LOG_SECONDS = 10.0
# Stage ids travel as uint8 (SPEC §2.5), so per-stage sums fit in a fixed 256-slot table.
MAX_STAGES = 256


@dataclass
class TrainConfig:
    """Training-loop settings (the model's are in ModelConfig). Times in steps unless named."""

    out_dir: str
    batch_size: int = 32
    max_iters: int = 1000
    eval_interval: int = 100
    eval_batches: int = 0  # first N batches of the val set; 0 = all of it
    log_interval: int = 10
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # step at which the cosine reaches min_lr; 0 = max_iters
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    loss_weighting: str = "none"
    compile: bool = False
    resume: bool = False
    data_timeout: float | None = None  # seconds without a train batch before run() raises TimeoutError; None = wait forever

    def __post_init__(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting {self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        if min(self.batch_size, self.max_iters, self.eval_interval, self.log_interval) < 1:
            raise ValueError("batch_size, max_iters, eval_interval and log_interval must be >= 1")


class Observer(Protocol):
    def on_start(self, trainer: "Trainer") -> None: ...
    def on_step(self, step: int, numbers: dict[str, Any]) -> None: ...
    def on_eval(self, step: int, numbers: dict[str, Any]) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_iters`` steps, then cosine decay to ``min_lr``."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if step < config.warmup_iters:
        return config.lr * (step + 1) / (config.warmup_iters + 1)
    if step >= decay_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D parameters (matrices, embeddings) only."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda"
    )


class ConsoleLog:
    """One log line per log step (and one for the evaluation before the first step)."""

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def on_step(self, step: int, numbers: dict[str, Any]) -> None:
        if not numbers["log"]:
            return
        val = f" | val {_format_val(numbers)}" if "val_loss" in numbers else ""
        log.info(
            "step %d | train %.4f%s | lr %.2e | %.1f ms/step | %.0f tok/s | data wait %.1f%%",
            step, numbers["train_loss"], val, numbers["lr"], numbers["ms_per_step"],
            numbers["tokens_per_s"], numbers["data_wait_pct"],
        )

    def on_eval(self, step: int, numbers: dict[str, Any]) -> None:
        if numbers["before_training"]:
            log.info("step %d | val %s (before training)", step, _format_val(numbers))

    def on_end(self, summary: dict[str, Any]) -> None:
        log.info("%s: %s", "stopped" if "stopped_by" in summary else "done", json.dumps(summary, default=str))


def _format_val(numbers: dict[str, Any]) -> str:
    text = f"{numbers['val_loss']:.4f}"
    if numbers.get("val_loss_by_stage"):
        text += " (" + ", ".join(f"stage {s} {v:.4f}" for s, v in numbers["val_loss_by_stage"].items()) + ")"
    return text


class MetricsFile:
    """``out_dir/metrics.jsonl``: one JSON line per log step, per evaluation, and the summary."""

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def on_start(self, trainer: "Trainer") -> None:
        pass

    def on_step(self, step: int, numbers: dict[str, Any]) -> None:
        if numbers["log"]:
            self._write({"kind": "train", "step": step, "time": time.time(), **numbers})

    def on_eval(self, step: int, numbers: dict[str, Any]) -> None:
        self._write({"kind": "eval", "step": step, "time": time.time(), **numbers})

    def on_end(self, summary: dict[str, Any]) -> None:
        self._write({"kind": "summary", "step": summary["steps"], "time": time.time(), **summary})
        self._file.close()


class Trainer:
    """Trains a BidirectionalTransformer on the batches of ``consumer``.

    Attributes for observers and diagnostics: ``config`` (TrainConfig), ``model_config``,
    ``model`` (the uncompiled module), ``meta`` (StreamMeta), ``consumer``, ``device``,
    ``step`` (optimizer steps done), ``val_batches`` (the fixed val batches evaluated),
    ``self_test`` (the mask self-test result), ``ranks`` (this process's place among the
    data-parallel ranks; ``Ranks()`` = one process), and :meth:`evaluate`.
    """

    def __init__(
        self,
        config: TrainConfig,
        model_args: dict[str, Any],
        consumer: Any,
        observers: Iterable[Observer] = (),
        ranks: Ranks | None = None,
    ) -> None:
        self.config = config
        self.model_args = dict(model_args)
        self.consumer = consumer
        self.extra_observers = list(observers)
        self.ranks = ranks or Ranks()
        self.device = resolve_device(config.device)
        self.step = 0
        self.meta: StreamMeta | None = None
        self.model_config: ModelConfig | None = None
        self.model: BidirectionalTransformer | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.val_batches: list[dict[str, torch.Tensor]] = []
        self.self_test: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] = {}
        self.last_train_loss: float | None = None
        # Per-stage train loss of the current log interval: supervised-position loss sums and counts.
        # Kept on the training device (no host sync per step); read at log steps.
        self._stage_loss_sum = torch.zeros(MAX_STAGES, dtype=torch.float64, device=self.device)
        self._stage_count = torch.zeros(MAX_STAGES, dtype=torch.float64, device=self.device)
        self.checkpoint_path = os.path.join(config.out_dir, CHECKPOINT_NAME)
        self._resumed = False

    # ---- start-up ----------------------------------------------------------------------

    def prepare(self, wait_timeout: float | None = None) -> None:
        """Wait for the stream, build (or resume) the model, and run the mask self-test.

        Raises MaskSelfTestError when the self-test fails, ValueError when the model does
        not cover the stream or a resumed checkpoint belongs to another vocabulary, and
        TimeoutError when ``wait_timeout`` seconds pass without meta or val set.
        """
        config = self.config
        os.makedirs(config.out_dir, exist_ok=True)
        torch.manual_seed(config.seed)
        self.meta = self._wait("stream meta", self._meta_within, wait_timeout)
        log.info(
            "stream: vocab_size %d, block_size %d, packing %s, corruption %s, corpus %s",
            self.meta.vocab_size, self.meta.block_size, self.meta.packing, self.meta.corruption,
            self.meta.corpus_fingerprint,
        )
        checkpoint = load_checkpoint(self.checkpoint_path, self.device) if config.resume else None
        if checkpoint:  # the checkpoint's model config wins over model_args
            _check_resumable(StreamMeta.from_dict(checkpoint["meta"]), self.meta)
            self.model_config = ModelConfig(**checkpoint["model_config"])
        else:
            self.model_config = ModelConfig.from_meta(self.meta, **self.model_args)
        self.model_config.check_covers(self.meta)
        self.model = BidirectionalTransformer(self.model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, config, self.device)
        if checkpoint:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.step = int(checkpoint["step"])
            set_rng_state(checkpoint["rng"])
            self._resumed = True
            log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        log.info("model: %s, %.2fM parameters, device %s", self.model_config.to_dict(), self.model.num_parameters() / 1e6, self.device)

        self._wait("val set", lambda t: self.consumer.wait_for_val_set(t) or None, wait_timeout)
        val_batches = self.consumer.val_batches()
        self.val_batches = val_batches[: config.eval_batches or None]
        if not self.val_batches:
            raise ValueError("the stream's val set is empty: nothing to evaluate or self-test on")
        self.self_test = mask_self_test(self.model, self._to_device(self.val_batches[0]), self.meta)
        log.info("mask self-test passed: %s", json.dumps(self.self_test))

    def _meta_within(self, seconds: float) -> StreamMeta | None:
        try:
            return self.consumer.wait_for_meta(seconds)
        except TimeoutError:
            return None

    def _wait(self, what: str, wait: Any, timeout: float | None) -> Any:
        """Call ``wait(seconds)`` until it returns something, logging every WAIT_LOG_SECONDS."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            chunk = WAIT_LOG_SECONDS if deadline is None else max(0.0, min(WAIT_LOG_SECONDS, deadline - time.monotonic()))
            result = wait(chunk)
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} arrived within {timeout:.0f} s")
            log.info("waiting for the %s: no producer has sent it yet", what)

    # ---- evaluation --------------------------------------------------------------------

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Mean cross-entropy over the supervised positions of ``batches`` (eval mode, no grad).

        Returns ``{"loss", "supervised", "by_stage"}``: ``by_stage`` maps each stage id
        present (as a string) to its loss, empty when the batches carry no ``stage``.
        """
        model = self.model
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros(MAX_STAGES, dtype=torch.float64, device=self.device)
        count = torch.zeros(MAX_STAGES, dtype=torch.float64, device=self.device)
        has_stages = False
        try:
            with torch.no_grad(), self._autocast():
                for batch in batches:
                    batch = self._to_device(batch)
                    logits, _ = model(batch["x"], batch["attention_mask"])
                    supervised = batch["y"] != IGNORE_INDEX
                    row_loss = token_losses(logits, batch["y"]).double().sum(dim=1)
                    row_count = supervised.double().sum(dim=1)
                    stage = batch.get("stage")
                    has_stages = has_stages or stage is not None
                    index = stage.long() if stage is not None else torch.zeros_like(row_count, dtype=torch.long)
                    loss_sum.index_add_(0, index, row_loss)
                    count.index_add_(0, index, row_count)
        finally:
            model.train(was_training)
        loss_sum, count = loss_sum.cpu(), count.cpu()
        total = float(count.sum())
        by_stage = {}
        if has_stages:
            by_stage = {str(s): float(loss_sum[s] / count[s]) for s in range(MAX_STAGES) if count[s] > 0}
        return {"loss": float(loss_sum.sum()) / max(total, 1.0), "supervised": int(total), "by_stage": by_stage}

    def _evaluate_and_checkpoint(self, before_training: bool) -> dict[str, Any]:
        started = time.perf_counter()
        result = self.evaluate(self.val_batches)
        numbers = {
            "val_loss": result["loss"],
            "val_loss_by_stage": result["by_stage"],
            "val_supervised": result["supervised"],
            "eval_ms": 1000 * (time.perf_counter() - started),
            "before_training": before_training,
        }
        if not before_training:
            self.save_checkpoint()
        self.last_eval = numbers
        return numbers

    def save_checkpoint(self) -> None:
        save_checkpoint(
            self.checkpoint_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "model_config": self.model_config.to_dict(),
                "train_config": asdict(self.config),
                "meta": self.meta.to_dict(),
                "rng": rng_state(),
            },
        )

    # ---- the loop ----------------------------------------------------------------------

    def _train_step(self, forward: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step; the loss and the pre-clipping gradient norm, still on the device."""
        with self._autocast():
            logits, _ = forward(batch["x"], batch["attention_mask"])
            losses = token_losses(logits, batch["y"])
            loss = weighted_mean_loss(losses, batch["y"], batch["mask_ratio"], self.config.loss_weighting)
        if "stage" in batch:
            self._add_stage_losses(losses.detach(), batch)
        loss.backward()
        grad_norm = None
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def _add_stage_losses(self, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Adds this batch's loss sums and supervised counts per stage id to the interval's totals.

        ``losses``: the step's per-position cross-entropy (B, T). Unweighted, also under
        ``inverse-t`` weighting (whose ``train_loss`` is the weighted mean): per-stage numbers
        compare across runs.
        """
        with torch.no_grad():
            row_loss = losses.double().sum(dim=1)
            row_count = (batch["y"] != IGNORE_INDEX).sum(dim=1).double()
            stage = batch["stage"].long()
            self._stage_loss_sum.index_add_(0, stage, row_loss)
            self._stage_count.index_add_(0, stage, row_count)

    def _take_stage_losses(self) -> dict[str, float]:
        """Mean train loss per stage id (as a string) since the last call, over every rank (a
        collective under DDP, so every rank calls it at the same log steps); empty without stages."""
        self.ranks.mean_(self._stage_loss_sum)
        self.ranks.mean_(self._stage_count)
        sums, counts = self._stage_loss_sum.tolist(), self._stage_count.tolist()
        self._stage_loss_sum.zero_()
        self._stage_count.zero_()
        return {str(stage): sums[stage] / count for stage, count in enumerate(counts) if count > 0}

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The consumer's next train batch; TimeoutError after ``data_timeout`` seconds without one."""
        try:
            return self.consumer.next_batch("train", timeout=self.config.data_timeout)
        except TimeoutError as error:
            raise TimeoutError(
                f"rank {self.ranks.rank}: no train batch for {self.config.data_timeout:.0f} s (--data-timeout) "
                f"on {getattr(self.consumer, 'endpoint', 'the stream')}: its producers stopped or never connected; "
                f"stopping at step {self.step}"
            ) from error

    def run(self) -> dict[str, Any]:
        """Train until ``max_iters`` steps are done; returns the summary. Call :meth:`prepare` first."""
        config = self.config
        ranks = self.ranks
        observers: list[Observer] = []
        if ranks.is_main:
            observers = [ConsoleLog(), MetricsFile(os.path.join(config.out_dir, METRICS_NAME), append=self._resumed)]
            observers += self.extra_observers
        forward = ranks.wrap(self.model)
        if config.compile:
            forward = torch.compile(forward)
        self.model.train()
        ranks.gather_stream_stats(self.consumer, self.step)
        for observer in observers:
            observer.on_start(self)
        if not self._resumed and ranks.is_main:
            numbers = self._evaluate_and_checkpoint(before_training=True)
            for observer in observers:
                observer.on_eval(self.step, numbers)

        read_every_step = self.device.type == "cpu"
        started = time.perf_counter()
        interval_start, interval_steps, interval_wait = started, 0, 0.0
        loss_sum = torch.zeros((), device=self.device)
        try:
            while self.step < config.max_iters:
                lr = learning_rate(self.step, config)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.perf_counter()
                batch = self._next_batch()
                data_wait = time.perf_counter() - step_start
                batch = self._to_device(batch)
                loss, grad_norm = self._train_step(forward, batch)
                loss_sum += loss
                self.step += 1
                interval_steps += 1
                interval_wait += data_wait

                is_eval = self.step % config.eval_interval == 0 or self.step == config.max_iters
                is_log = is_eval or self.step % config.log_interval == 0
                numbers: dict[str, Any] = {
                    "log": is_log,
                    "lr": lr,
                    "step_ms": 1000 * (time.perf_counter() - step_start),
                    "data_wait_ms": 1000 * data_wait,
                    "tokens": batch["x"].numel() * ranks.world_size,
                }
                if read_every_step or is_log:
                    numbers["step_loss"] = loss.item()
                if is_log:
                    ranks.mean_(loss_sum)
                    ranks.gather_stream_stats(self.consumer, self.step)
                    elapsed = time.perf_counter() - interval_start
                    numbers.update(
                        train_loss=loss_sum.item() / interval_steps,
                        train_loss_by_stage=self._take_stage_losses(),
                        grad_norm=None if grad_norm is None else grad_norm.item(),
                        ms_per_step=1000 * elapsed / interval_steps,
                        tokens_per_s=numbers["tokens"] * interval_steps / elapsed,
                        data_wait_pct=100 * interval_wait / elapsed,
                    )
                eval_numbers = self._evaluate_and_checkpoint(before_training=False) if is_eval and ranks.is_main else None
                if eval_numbers:
                    numbers.update(val_loss=eval_numbers["val_loss"], val_loss_by_stage=eval_numbers["val_loss_by_stage"])
                for observer in observers:
                    observer.on_step(self.step, numbers)
                if eval_numbers:
                    for observer in observers:
                        observer.on_eval(self.step, eval_numbers)
                if is_log:
                    loss_sum.zero_()
                    interval_start, interval_steps, interval_wait = time.perf_counter(), 0, 0.0
                    self.last_train_loss = numbers["train_loss"]

        except (KeyboardInterrupt, SystemExit) as interruption:  # Ctrl-C, or SIGTERM via trainer.__main__
            # No collectives here (stream_stats uses the last gathered numbers): under DDP the
            # other ranks may be gone already.
            summary = {
                "steps": self.step,
                "stopped_by": type(interruption).__name__,
                "train_loss": self.last_train_loss,
                "val_loss": self.last_eval.get("val_loss"),
                "val_loss_by_stage": self.last_eval.get("val_loss_by_stage"),
                "wall_s": time.perf_counter() - started,
                "stream": ranks.stream_stats(self.consumer),
            }
            for observer in observers:
                observer.on_end(summary)
            raise
        ranks.gather_stream_stats(self.consumer, self.step)
        digests = ranks.gather(parameter_digest(self.model)) if ranks.distributed else None
        summary = {
            "steps": self.step,
            "train_loss": self.last_train_loss,
            "val_loss": self.last_eval.get("val_loss"),
            "val_loss_by_stage": self.last_eval.get("val_loss_by_stage"),
            "wall_s": time.perf_counter() - started,
            "stream": ranks.stream_stats(self.consumer),
        }
        if digests is not None:  # rank 0: one per rank; all equal when DDP kept the ranks in sync
            summary.update(world_size=ranks.world_size, parameter_digests=digests)
        for observer in observers:
            observer.on_end(summary)
        return summary


def _check_resumable(trained_on: StreamMeta, stream: StreamMeta) -> None:
    """A checkpoint resumes only on a stream whose ids mean the same tokens."""
    differences = [d for d in trained_on.differences(stream) if d[0] in ("vocab", "block_size")]
    if differences:
        detail = "; ".join(f"{name}: checkpoint {mine!r:.60} vs stream {theirs!r:.60}" for name, mine, theirs in differences)
        raise ValueError(f"the checkpoint was trained on another stream ({detail})")
