"""The training loop (docs/SPEC.md §7): stream meta -> model -> mask self-test -> AdamW steps.

:class:`Trainer` pulls batches from a :class:`~trainer.data.source.BatchSource`, builds the
model from the stream meta (or resumes it from a checkpoint), refuses to train when
:func:`trainer.model.selftest.mask_self_test` fails, then runs AdamW with linear warm-up and
cosine decay, gradient clipping and bf16 autocast on CUDA. It evaluates on the fixed val set
and writes an atomic checkpoint every ``eval_interval`` steps, and publishes
:mod:`trainer.loop.numbers` to observers (:mod:`trainer.loop.observers`). SIGINT or SIGTERM
stops it before the next step (or while it waits for data), with a checkpoint of the step
reached (:mod:`trainer.loop.stopping`: at most ``STOP_CHECKPOINT_S`` seconds; else, or at a
second signal, the previous checkpoint stands).

Data-parallel (``ranks``, a :class:`trainer.loop.distributed.Ranks` from torchrun): every rank
trains a ``DistributedDataParallel`` copy on its own source's batches; only rank 0 evaluates,
checkpoints and has observers. ``tokens`` and ``tokens_per_s`` then count every rank's batch,
``train_loss`` is the mean over the ranks, and ``step_loss`` is this rank's own. Every rank
takes part in the collectives at log steps (loss mean, stream stats gather) and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import torch

from shared.meta import StreamMeta
from trainer.data.source import Batch, BatchSource
from trainer.loop.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointWriteError, rng_state, save_checkpoint, set_rng_state
from trainer.loop.config import TrainConfig
from trainer.loop.distributed import Ranks, parameter_digest
from trainer.loop.interval import LogInterval
from trainer.loop.live_samples import LiveSampler
from trainer.loop.numbers import EvalNumbers, RunStart, RunSummary, StepNumbers
from trainer.loop.observers import METRICS_NAME, ConsoleLog, MetricsFile, Observer
from trainer.loop.schedule import learning_rate, make_optimizer, resolve_device
from trainer.loop.startup import (
    check_nothing_to_overwrite,
    checkpoint_to_resume,
    model_config_for,
    seek_data,
    wait_for_stream,
    wait_for_val_batches,
)
from trainer.loop.stopping import StopSignals, checkpoint_on_stop, next_train_batch
from trainer.model.evaluation import EvalResult, evaluate
from trainer.model.losses import supervised_loss
from trainer.model.selftest import mask_self_test
from trainer.model.transformer import BidirectionalTransformer, ModelConfig
from trainer.runtime.fds import out_of_descriptors

log = logging.getLogger("trainer")


class Trainer:
    """Trains a BidirectionalTransformer on the batches of ``source``.

    Attributes for observers and diagnostics: ``config`` (TrainConfig), ``model_config``,
    ``model`` (the uncompiled module), ``meta`` (StreamMeta), ``consumer`` (the source),
    ``device``, ``step`` (optimizer steps done), ``val_batches`` (the fixed val batches
    evaluated), ``self_test`` (the mask self-test result), ``ranks`` (this process's place among
    the data-parallel ranks; ``Ranks()`` = one process), and :meth:`evaluate`.
    """

    def __init__(self, config: TrainConfig, model_config: ModelConfig, source: BatchSource,
                 observers: Iterable[Observer] = (), ranks: Ranks | None = None) -> None:
        self.config = config
        self.requested_model = model_config
        self.consumer = source
        self.extra_observers = list(observers)
        self.ranks = ranks or Ranks()
        self.device = resolve_device(config.device)
        self.step = 0
        self.meta: StreamMeta | None = None
        self.model_config: ModelConfig | None = None
        self.model: BidirectionalTransformer | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.val_batches: list[Batch] = []
        self.self_test: dict[str, Any] | None = None
        self.last_eval: EvalNumbers | None = None
        self.typical_length = 0
        self._sampler: LiveSampler | None = None
        self.checkpoint_path = os.path.join(config.out_dir, CHECKPOINT_NAME)
        self._resumed = False
        self._saved_step = 0  # the step the checkpoint on disk holds (0: none, or nothing trained yet)
        self._stop = StopSignals()
        self._interval = LogInterval(self.device, self.ranks)

    # ---- start-up ----------------------------------------------------------------------

    def prepare(self, wait_timeout: float | None = None) -> None:
        """Wait for the stream, build (or resume) the model, and run the mask self-test.

        Raises MaskSelfTestError when the self-test fails, ValueError when the model does
        not cover the stream or a resumed checkpoint is unusable or belongs to another
        vocabulary, FileNotFoundError for ``--resume`` without a checkpoint, and TimeoutError
        when ``wait_timeout`` seconds pass without meta or val set; ValueError also when
        ``out_dir`` holds an earlier run and ``resume`` is ``never`` (nothing is overwritten).
        """
        config = self.config
        check_nothing_to_overwrite(config)
        os.makedirs(config.out_dir, exist_ok=True)
        torch.manual_seed(config.seed)
        self.meta = wait_for_stream(self.consumer, wait_timeout)
        self._interval.source_names = tuple(source.name for source in self.meta.sources)
        log.info("stream: vocab_size %d, block_size %d, packing %s, corruption %s, corpus %s", self.meta.vocab_size,
                 self.meta.block_size, self.meta.packing, self.meta.corruption.json_text, self.meta.corpus_fingerprint)
        checkpoint = checkpoint_to_resume(config, self.checkpoint_path, self.device)
        self.model_config = model_config_for(checkpoint, self.requested_model, self.meta)
        self.model = BidirectionalTransformer(self.model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, config, self.device)
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.step = self._saved_step = checkpoint.step
            set_rng_state(checkpoint.rng)
            self._resumed = True
            log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        seek_data(self.consumer, checkpoint, self.ranks.rank, self.ranks.world_size)
        log.info("model: %s, %.2fM parameters, device %s", self.model_config.to_dict(), self.model.num_parameters() / 1e6,
                 self.device)
        self.val_batches = wait_for_val_batches(self.consumer, wait_timeout, config.eval_batches or None)
        lengths = torch.cat([batch["attention_mask"].sum(dim=1) for batch in self.val_batches])
        self.typical_length = int(lengths.float().median())  # what trainer.sample writes by default
        if config.eval_samples:
            self._sampler = LiveSampler(self.meta, self.val_batches, config.eval_samples, config.eval_sample_length,
                                        config.eval_sample_budget)
        self.self_test = mask_self_test(self.model, self._to_device(self.val_batches[0]), self.meta)
        log.info("mask self-test passed: %s", json.dumps(self.self_test))

    # ---- evaluation and checkpoints ----------------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        return {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self, batches: list[Batch]) -> EvalResult:
        """Mean cross-entropy over the supervised positions of ``batches`` (eval mode, no grad), per source by name."""
        return evaluate(self.model, batches, self.device, self._autocast, [source.name for source in self.meta.sources])

    def _evaluate_and_checkpoint(self, before_training: bool) -> EvalNumbers:
        started = time.perf_counter()
        result = self.evaluate(self.val_batches)
        eval_ms = 1000 * (time.perf_counter() - started)
        samples = None
        if self._sampler is not None:
            started = time.perf_counter()
            samples = self._sampler.run(self.model, self.step, eval_ms / 1000, self._autocast)
        bound = result.weighted if self.meta.corruption.nll_bound_unavailable() is None else None
        numbers = EvalNumbers(step=self.step, val_loss=result.loss, val_loss_by_stage=result.by_stage,
                              val_supervised=result.supervised, eval_ms=eval_ms, before_training=before_training,
                              val_nll_bound=bound, samples=samples, val_loss_by_source=result.by_source or None,
                              samples_ms=None if samples is None else 1000 * (time.perf_counter() - started))
        if not before_training:
            self.save_checkpoint()
        self.last_eval = numbers
        return numbers

    def save_checkpoint(self) -> None:
        """Writes the checkpoint; one that cannot be written for lack of file descriptors (a peer
        holds them) is skipped with a warning, any other failure raises CheckpointWriteError."""
        try:
            self._write_checkpoint()
        except CheckpointWriteError as error:
            if not out_of_descriptors(error):
                raise
            log.warning("checkpoint of step %d skipped, training goes on (the next evaluation writes one): %s", self.step, error)

    def _write_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, Checkpoint(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), step=self.step,
            model_config=self.model_config, meta=self.meta, train_config=dataclasses.asdict(self.config),
            rng=rng_state(), sample_length=self.typical_length, cursor=self.consumer.cursor))
        self._saved_step = self.step

    # ---- the loop ----------------------------------------------------------------------

    def _train_step(self, forward: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step; the loss and the pre-clipping gradient norm, still on the device."""
        with self._autocast():
            logits = forward(batch["x"], batch["attention_mask"])
            loss, losses = supervised_loss(logits, batch["y"], batch["mask_ratio"], self.config.loss_weighting)
        self._interval.add_row_losses(losses.detach(), batch)
        loss.backward()
        grad_norm = None
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def _one_step(self, forward: Any) -> StepNumbers:
        """Trains one step; its numbers, with the log-step numbers when this is a log step."""
        config = self.config
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        batch = next_train_batch(self.consumer, self._stop, self.config.data_timeout, self.ranks.rank, self.step)
        data_wait = time.perf_counter() - step_start
        loss, grad_norm = self._train_step(forward, self._to_device(batch))
        self.step += 1
        self._interval.add_step(loss, data_wait)
        is_log = self._is_eval_step() or self.step % config.log_interval == 0
        numbers = StepNumbers(step=self.step, log=is_log, lr=lr, step_ms=1000 * (time.perf_counter() - step_start),
                              data_wait_ms=1000 * data_wait, tokens=batch["x"].numel() * self.ranks.world_size,
                              step_loss=loss.item() if self.device.type == "cpu" or is_log else None)
        if is_log:
            self.ranks.gather_stream_stats(self.consumer, self.step)
            numbers = self._interval.close(numbers, grad_norm)
        return numbers

    def _is_eval_step(self) -> bool:
        return self.step % self.config.eval_interval == 0 or self.step == self.config.max_iters

    def _observers(self) -> list[Observer]:
        if not self.ranks.is_main:
            return []
        metrics = MetricsFile(os.path.join(self.config.out_dir, METRICS_NAME))
        return [ConsoleLog(), metrics, *self.extra_observers]

    def run(self) -> RunSummary:
        """Train until ``max_iters`` steps are done; returns the summary. Call :meth:`prepare` first."""
        ranks = self.ranks
        observers = self._observers()
        forward = ranks.wrap(self.model)
        if self.config.compile:
            forward = torch.compile(forward)
        self.model.train()
        ranks.gather_stream_stats(self.consumer, self.step)
        start = RunStart(meta=self.meta, step=self.step, consumer=self.consumer, model=self.model, val_batches=self.val_batches)
        for observer in observers:
            observer.on_start(start)
        if not self._resumed and ranks.is_main:
            numbers = self._evaluate_and_checkpoint(before_training=True)
            for observer in observers:
                observer.on_eval(numbers)
        started = time.perf_counter()
        self._interval.restart()
        try:
            with self._stop.installed():
                self._loop(forward, observers)
        except (KeyboardInterrupt, SystemExit) as interruption:  # Ctrl-C, or SIGTERM via trainer.__main__
            # The handlers are back: a second signal abandons the checkpoint. No collectives here
            # (stream_stats uses the last gathered numbers): under DDP the other ranks may be gone already.
            stopped_by = type(interruption).__name__
            if ranks.is_main and self.step != self._saved_step:  # else the checkpoint on disk holds this step
                checkpoint_on_stop(self._write_checkpoint, stopped_by, self.step, self._saved_step, self.checkpoint_path)
            summary = self._summary(started, stopped_by=stopped_by)
            for observer in observers:
                observer.on_end(summary)
            raise
        ranks.gather_stream_stats(self.consumer, self.step)
        digests = ranks.gather(parameter_digest(self.model)) if ranks.distributed else None
        summary = self._summary(started, digests=digests)
        for observer in observers:
            observer.on_end(summary)
        return summary

    def _loop(self, forward: Any, observers: list[Observer]) -> None:
        """The steps up to ``max_iters``; a stop signal acts where a step waits for its batch (``next_train_batch``)."""
        ranks = self.ranks
        while self.step < self.config.max_iters:
            numbers = self._one_step(forward)
            is_eval = self._is_eval_step() and ranks.is_main
            eval_numbers = self._evaluate_and_checkpoint(before_training=False) if is_eval else None
            if eval_numbers is not None:
                numbers = numbers.with_eval(eval_numbers)
            for observer in observers:
                observer.on_step(numbers)
            if eval_numbers is not None:
                for observer in observers:
                    observer.on_eval(eval_numbers)

    def _summary(self, started: float, stopped_by: str | None = None, digests: list[str] | None = None) -> RunSummary:
        last_eval = self.last_eval
        return RunSummary(
            steps=self.step, train_loss=self._interval.last_train_loss,
            val_loss=None if last_eval is None else last_eval.val_loss,
            val_loss_by_stage=None if last_eval is None else last_eval.val_loss_by_stage,
            val_loss_by_source=None if last_eval is None else last_eval.val_loss_by_source,
            wall_s=time.perf_counter() - started, stream=self.ranks.stream_stats(self.consumer), stopped_by=stopped_by,
            world_size=self.ranks.world_size if digests is not None else None, parameter_digests=digests,
        )
