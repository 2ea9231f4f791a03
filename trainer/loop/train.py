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
from trainer.data.orders import Cursor
from trainer.data.source import Batch, BatchSource
from trainer.fds import out_of_descriptors
from trainer.loop.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointWriteError, rng_state, save_checkpoint, set_rng_state
from trainer.loop.config import TrainConfig
from trainer.loop.distributed import Ranks, parameter_digest
from trainer.loop.interval import LogInterval
from trainer.loop.live_samples import LiveSampler
from trainer.loop.numbers import EvalNumbers, RunStart, RunSummary, StepNumbers
from trainer.loop.observers import METRICS_NAME, ConsoleLog, MetricsFile, Observer
from trainer.loop.schedule import learning_rate, make_optimizer, resolve_device
from trainer.loop.startup import check_nothing_to_overwrite, checkpoint_to_resume, model_config_for, wait_for
from trainer.loop.stopping import STOP_CHECKPOINT_S, STOP_POLL_S, StopSignals, deadline
from trainer.model.evaluation import EvalResult, evaluate
from trainer.model.losses import supervised_loss
from trainer.model.selftest import mask_self_test
from trainer.model.transformer import BidirectionalTransformer, ModelConfig

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
        self.meta = wait_for("stream meta", self._meta_within, wait_timeout, self._why_no_meta)
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
        cursor = checkpoint.cursor if checkpoint is not None else None
        if cursor is None and checkpoint is not None:
            log.warning("the checkpoint holds no data cursor (written before the schedule existed): the data starts over")
        self.consumer.seek(cursor or Cursor(world=self.ranks.world_size))
        if cursor is not None:
            log.info("data resumes at train message k=%d (%d rows of it used), the cursor of step %d",
                     self.ranks.rank + cursor.position * cursor.world, cursor.rows_used, self.step)
        log.info("model: %s, %.2fM parameters, device %s", self.model_config.to_dict(), self.model.num_parameters() / 1e6,
                 self.device)
        wait_for("val set", lambda seconds: self.consumer.wait_for_val_set(seconds) or None, wait_timeout, self._why_no_val_set)
        self.val_batches = self.consumer.val_batches()[: config.eval_batches or None]
        if not self.val_batches:
            raise ValueError("the stream's val set is empty: nothing to evaluate or self-test on")
        lengths = torch.cat([batch["attention_mask"].sum(dim=1) for batch in self.val_batches])
        self.typical_length = int(lengths.float().median())  # what trainer.sample writes by default
        if config.eval_samples:
            self._sampler = LiveSampler(self.meta, self.val_batches, config.eval_samples, config.eval_sample_length,
                                        config.eval_sample_budget)
        self.self_test = mask_self_test(self.model, self._to_device(self.val_batches[0]), self.meta)
        log.info("mask self-test passed: %s", json.dumps(self.self_test))

    def _why_no_meta(self) -> str:
        return (f"no producer has announced a stream on {getattr(self.consumer, 'endpoint', 'the endpoint')} yet (start one: "
                f"python -m producer run --connect tcp://HOST:PORT; one of another stream is refused and named in this log)")

    def _why_no_val_set(self) -> str:
        stats = self.consumer.stats()
        return (f"{stats.val_messages_seen} of {stats.val_messages_total} val messages so far; the trainer orders them from "
                f"its producers ({len(stats.producers)} seen): a live producer sends them at once, a replay only if its "
                f"recording holds them (python -m producer record writes them; an old recording may not)")

    def _meta_within(self, seconds: float) -> StreamMeta | None:
        try:
            return self.consumer.wait_for_meta(seconds)
        except TimeoutError:
            return None

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

    def _checkpoint_on_stop(self, stopped_by: str) -> None:
        """On the way out after a signal: a checkpoint of the step reached, unless the one on disk
        holds it already; bounded by STOP_CHECKPOINT_S seconds, and a second signal abandons it
        (then the previous checkpoint stands, whole)."""
        if self.step == self._saved_step:
            return
        started = time.perf_counter()
        try:
            with deadline(STOP_CHECKPOINT_S):
                self._write_checkpoint()
        except (CheckpointWriteError, TimeoutError, KeyboardInterrupt, SystemExit) as error:
            log.warning("%s at step %d: its checkpoint was not written (%s: %s); the one of step %d stands", stopped_by,
                        self.step, type(error).__name__, error, self._saved_step)
            return
        log.info("%s at step %d: checkpoint written to %s in %.2f s", stopped_by, self.step, self.checkpoint_path,
                 time.perf_counter() - started)

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
        if "stage" in batch:
            self._interval.add_stage_losses(losses.detach(), batch)
        loss.backward()
        grad_norm = None
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def _next_batch(self) -> Batch:
        """The source's next train batch; TimeoutError after ``data_timeout`` seconds without one.
        Waits in pieces of STOP_POLL_S seconds, acting on a stop signal between them."""
        timeout = self.config.data_timeout
        deadline_at = None if timeout is None else time.monotonic() + timeout
        while True:
            self._stop.check()
            wait = STOP_POLL_S if deadline_at is None else max(0.0, min(STOP_POLL_S, deadline_at - time.monotonic()))
            try:
                return self.consumer.next_batch("train", timeout=wait)
            except TimeoutError as error:
                if deadline_at is not None and time.monotonic() >= deadline_at:
                    raise TimeoutError(
                        f"rank {self.ranks.rank}: no train batch for {timeout:.0f} s (--data-timeout) "
                        f"on {getattr(self.consumer, 'endpoint', 'the stream')}: its producers stopped or never connected; "
                        f"stopping at step {self.step}"
                    ) from error

    def _one_step(self, forward: Any) -> StepNumbers:
        """Trains one step; its numbers, with the log-step numbers when this is a log step."""
        config = self.config
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        batch = self._next_batch()
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
            if ranks.is_main:
                self._checkpoint_on_stop(stopped_by)
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
        """The steps up to ``max_iters``; a stop signal acts where a step waits for its batch (:meth:`_next_batch`)."""
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
