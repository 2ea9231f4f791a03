"""Who hears the training loop: the observer interface, the console log and ``metrics.jsonl``.

The loop calls, on rank 0 only::

    on_start(start)        once, after the self-test, before the first step
    on_step(numbers)       after every optimizer step (StepNumbers)
    on_eval(numbers)       after every evaluation (EvalNumbers)
    on_end(summary)        once, after the last step or an interruption (RunSummary)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from trainer.loop.numbers import EvalNumbers, RunStart, RunSummary, StepNumbers

log = logging.getLogger("trainer")

METRICS_NAME = "metrics.jsonl"


class Observer(Protocol):
    def on_start(self, start: RunStart) -> None: ...
    def on_step(self, numbers: StepNumbers) -> None: ...
    def on_eval(self, numbers: EvalNumbers) -> None: ...
    def on_end(self, summary: RunSummary) -> None: ...


def _format_val(numbers: StepNumbers | EvalNumbers) -> str:
    text = f"{numbers.val_loss:.4f}"
    parts = [f"stage {s} {v:.4f}" for s, v in (numbers.val_loss_by_stage or {}).items()]
    parts += [f"{name} {v:.4f}" for name, v in (numbers.val_loss_by_source or {}).items()]
    return text + (" (" + ", ".join(parts) + ")" if parts else "")


class ConsoleLog:
    """One log line per log step (and one for the evaluation before the first step)."""

    def on_start(self, start: RunStart) -> None:
        pass

    def on_step(self, numbers: StepNumbers) -> None:
        if not numbers.log:
            return
        val = f" | val {_format_val(numbers)}" if numbers.val_loss is not None else ""
        log.info(
            "step %d | train %.4f%s | lr %.2e | %.1f ms/step | %.0f tok/s | data wait %.1f%%",
            numbers.step, numbers.train_loss, val, numbers.lr, numbers.ms_per_step, numbers.tokens_per_s, 100 * numbers.data_wait_fraction,
        )

    def on_eval(self, numbers: EvalNumbers) -> None:
        if numbers.before_training:
            log.info("step %d | val %s (before training)", numbers.step, _format_val(numbers))

    def on_end(self, summary: RunSummary) -> None:
        log.info("%s: %s", "stopped" if summary.stopped_by else "done", json.dumps(summary.record(), default=str))


class MetricsFile:
    """``out_dir/metrics.jsonl``: one JSON line per log step, per evaluation, and the summary.

    Appended to, never truncated: a resumed run's curve goes on after the earlier lines (a run
    that does not resume refuses a folder that holds metrics, ``trainer.loop.startup``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def on_start(self, start: RunStart) -> None:
        pass

    def on_step(self, numbers: StepNumbers) -> None:
        if numbers.log:
            self._write({"kind": "train", "time": time.time(), **numbers.record()})

    def on_eval(self, numbers: EvalNumbers) -> None:
        self._write({"kind": "eval", "time": time.time(), **numbers.record()})

    def on_end(self, summary: RunSummary) -> None:
        self._write({"kind": "summary", "step": summary.steps, "time": time.time(), **summary.record()})
        self._file.close()
