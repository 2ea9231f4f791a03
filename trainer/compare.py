"""``python -m trainer.compare``: the fixed-window baseline against line-aligned packing, A/B (docs/SPEC.md §9).

    python -m trainer.compare --corpus FILE --out DIR [--policy uniform|bert] [--max-iters N]
                              [--loss-weighting none|inverse-t] [model, optimizer and data flags]

Its data, training and model flags are the producer's and the trainer's own (the same names,
defaults and ``LINEPACK_*`` variables), passed on to every process of both arms.

Two arms that differ only in ``--packing``: ``fixed`` (the baseline) and ``lines`` (line-aligned
rows ending in [SEP]). Each arm is a real ``python -m trainer`` process fed by real
``python -m producer run`` processes over ZeroMQ on 127.0.0.1, with the same model, optimizer,
seed, batch size, block size and steps (so the same B*T*steps position budget), corruption
policy and loss weighting. The arms run one after the other, so they do not share the CPU.

Like-for-like number: before the arms, ``python -m producer record --split val --packing lines``
writes one common held-out set (the val lines, line-aligned, corrupted under ``--common-seed``).
After each arm its final checkpoint is evaluated on that set, and the attention probe and the
``context_blind`` alarm (trainer.diagnostics.probe, trainer.diagnostics.alarms) are computed on it. Each arm's own val
loss (its own val set, from its metrics.jsonl) is reported too.

Writes to ``--out``: ``report.json`` (settings, commands, the per-log-step train loss and the
per-eval val loss of both arms, the context-free floor, final numbers, probe and alarms),
``report.md`` (the table), ``report.png`` (curves and floor; skipped with a message when
matplotlib, the ``plots`` extra, is missing), ``common_val.lps``, and per arm ``fixed/`` and
``lines/``: the trainer's run directory (metrics.jsonl, ckpt.pt), ``trainer.log``,
``producer-N.log`` and ``diagnostics.json`` (the last ``GET /diagnostics`` answer seen while it
trained). Exit status 0 when both arms finished, 1 otherwise (the failing log is named), 2 when
``--out`` holds an earlier comparison's arm runs (nothing is overwritten: remove them or choose
another ``--out``).

Producers are started as processes; this module never imports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from shared import settings
from shared.data_config import DataConfig
from shared.endpoints import free_port
from shared.limits import MAX_VAL_ROWS
from shared.settings import setting
from trainer.analysis.common_set import load_val_recording
from trainer.analysis.report import arm_result, build_report, markdown, plot
from trainer.diagnostics.config import DiagnosticsSettings
from trainer.diagnostics.floor import context_free_floor
from trainer.loop.config import TrainConfig
from trainer.loop.startup import earlier_run
from trainer.model.transformer import ModelConfig
from trainer.runtime.processes import Child, python_module, stop_all

ARMS = ("fixed", "lines")  # the baseline first
COMMON_NAME = "common_val.lps"
WAIT_TIMEOUT_S = 300  # the trainer gives up when no producer data arrives within this (at start or mid-run)
DATA_SKIP = ("packing", "producer_id")  # packing is the arm; ids are per producer
TRAIN_SKIP = ("out_dir", "resume", "seed", "threads")  # per arm, or the data seed


@dataclass(frozen=True)
class CompareSettings:
    out: str | None = setting(None, "report folder (created; arms go in OUT/fixed and OUT/lines)", metavar="DIR")
    arm_timeout_s: float | None = setting(None, "stop an arm that runs longer than this (none: no limit)", metavar="S")
    producers: int = setting(1, "producer processes per arm", metavar="N")
    poll_s: float = setting(2.0, "seconds between GET /diagnostics polls", metavar="S")
    common_seed: int = setting(1, "corruption seed of the common held-out set", metavar="SEED")


@dataclass(frozen=True)
class Plan:
    """One comparison, fully specified: both arms share all of it but the packing."""

    compare: CompareSettings
    data: DataConfig
    train: TrainConfig
    model: ModelConfig
    alarm_warmup_steps: int

    def settings(self) -> dict[str, Any]:
        """Every setting of the run in one flat dict (the report's ``settings``)."""
        model = {name: value for name, value in dataclasses.asdict(self.model).items() if name not in ("vocab_size", "block_size")}
        return {**dataclasses.asdict(self.compare), **dataclasses.asdict(self.train), **model, **dataclasses.asdict(self.data),
                "alarm_warmup_steps": self.alarm_warmup_steps}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.compare", description=__doc__.split("\n")[0])
    settings.add_arguments(parser, CompareSettings, required=("out",))
    settings.add_arguments(parser, DataConfig, skip=DATA_SKIP, title="data (both arms and the common set; --seed also "
                                                                      "seeds training)")
    settings.add_arguments(parser, TrainConfig, skip=TRAIN_SKIP, title="training (both arms)")
    settings.add_arguments(parser, ModelConfig, title="model (both arms)")
    settings.add_arguments(parser, DiagnosticsSettings, only=("alarm_warmup_steps",))
    return parser


def parse_plan(argv: list[str]) -> Plan:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        data = settings.from_namespace(DataConfig, args)
        return Plan(
            compare=settings.from_namespace(CompareSettings, args),
            data=data,
            train=settings.from_namespace(TrainConfig, args, out_dir=".", seed=data.seed),
            model=settings.from_namespace(ModelConfig, args),
            alarm_warmup_steps=args.alarm_warmup_steps,
        )
    except ValueError as error:
        parser.error(str(error))


# ---- command lines ----------------------------------------------------------------------

def data_flags(plan: Plan) -> list[str]:
    """The producer data flags both arms and the common set share (not packing, not seed)."""
    return settings.to_argv(plan.data, skip=(*DATA_SKIP, "seed"), changed_only=True)


def producer_command(plan: Plan, packing: str, endpoint: str, producer_id: int) -> list[str]:
    return python_module("producer", "run", "--connect", endpoint, "--producer-id", str(producer_id), "--status-every", "60",
                         "--packing", packing, "--seed", str(plan.data.seed), *data_flags(plan))


def trainer_command(plan: Plan, out_dir: str, endpoint: str, http_port: int) -> list[str]:
    return python_module("trainer", "--bind", endpoint, "--out-dir", out_dir, "--http-host", "127.0.0.1",
                         "--http-port", str(http_port), "--wait-timeout", str(WAIT_TIMEOUT_S),
                         "--data-timeout", str(WAIT_TIMEOUT_S), "--seed", str(plan.data.seed),
                         *settings.to_argv(plan.train, skip=TRAIN_SKIP), *settings.to_argv(plan.model),
                         "--alarm-warmup-steps", str(plan.alarm_warmup_steps))


def record_command(plan: Plan, path: str) -> list[str]:
    messages = -(-MAX_VAL_ROWS // plan.data.rows_per_message)  # covers the val set; duplicates are dropped by val_index
    return python_module("producer", "record", "--out", path, "--messages", str(messages), "--split", "val",
                         "--packing", "lines", "--seed", str(plan.compare.common_seed), *data_flags(plan))


# ---- one arm ------------------------------------------------------------------------------

def get_diagnostics(port: int) -> dict[str, Any] | None:
    """The trainer's ``GET /diagnostics`` answer, or None while it is not reachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/diagnostics", timeout=2.0) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def log_tail(path: str, lines: int = 15) -> str:
    with open(path, encoding="utf-8", errors="replace") as file:
        return "".join(file.readlines()[-lines:])


def run_arm(plan: Plan, packing: str) -> dict[str, Any]:
    """Train one arm through producer processes -> ZeroMQ -> trainer process; its commands and
    the last diagnostics seen. Raises RuntimeError when the trainer fails or times out."""
    arm_dir = os.path.join(plan.compare.out, packing)
    os.makedirs(arm_dir, exist_ok=True)
    endpoint, http_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    trainer_argv = trainer_command(plan, arm_dir, endpoint, http_port)
    producer_argvs = [producer_command(plan, packing, endpoint, i) for i in range(plan.compare.producers)]
    print(f"[compare] {packing}: {shlex.join(trainer_argv)}", flush=True)
    trainer = Child("trainer", trainer_argv, os.path.join(arm_dir, "trainer.log"))
    producers = [Child(f"producer-{i}", argv, os.path.join(arm_dir, f"producer-{i}.log")) for i, argv in enumerate(producer_argvs)]
    timeout = plan.compare.arm_timeout_s
    deadline = None if timeout is None else time.monotonic() + timeout
    last_diagnostics = None
    try:
        while trainer.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the {packing} arm ran longer than {timeout:.0f} s; see {arm_dir}/trainer.log")
            time.sleep(plan.compare.poll_s)
            last_diagnostics = get_diagnostics(http_port) or last_diagnostics
    finally:
        stop_all([trainer, *producers], quiet=True)
    if trainer.process.returncode != 0:
        log_path = os.path.join(arm_dir, "trainer.log")
        raise RuntimeError(f"the {packing} trainer exited with {trainer.process.returncode}; {log_path} ends:\n{log_tail(log_path)}")
    with open(os.path.join(arm_dir, "diagnostics.json"), "w", encoding="utf-8") as file:
        json.dump(last_diagnostics, file, indent=1)
    return {
        "commands": {"trainer": shlex.join(trainer_argv), "producers": [shlex.join(argv) for argv in producer_argvs]},
        "diagnostics": last_diagnostics,
    }


# ---- the whole comparison -------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plan = parse_plan(argv)
    # Leave through SystemExit on SIGTERM, so run_arm's finally stops the arm's processes.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return compare(plan, "python -m trainer.compare " + shlex.join(argv))
    finally:
        signal.signal(signal.SIGTERM, previous)


def compare(plan: Plan, command: str) -> int:
    """Record the common set, run both arms, write the report; the exit status."""
    out = plan.compare.out
    held = [f"{os.path.join(out, packing)} ({found})" for packing in ARMS
            if (found := earlier_run(os.path.join(out, packing))) is not None]
    if held:
        print(f"[compare] {', '.join(held)}: an earlier comparison's runs are there and nothing was overwritten; "
              f"remove them or choose another --out", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    common_path = os.path.join(out, COMMON_NAME)
    record = subprocess.run(record_command(plan, common_path), capture_output=True, text=True)
    if record.returncode != 0:
        print(f"[compare] recording the common held-out set failed:\n{record.stderr}", file=sys.stderr)
        return 1
    common_meta, common_batches = load_val_recording(common_path, plan.train.batch_size)
    floor = context_free_floor(common_meta, "val")
    common = {
        "path": common_path,
        "command": shlex.join(record_command(plan, common_path)),
        "rows": sum(len(batch["x"]) for batch in common_batches),
        "supervised": int(sum(int((batch["y"] != common_meta.ignore_index).sum()) for batch in common_batches)),
        "context_free_floor": floor,
        "corruption": common_meta.corruption.label(),
    }
    arms = {}
    for packing in ARMS:
        try:
            run = run_arm(plan, packing)
        except RuntimeError as error:
            print(f"[compare] {error}", file=sys.stderr)
            return 1
        arms[packing] = arm_result(os.path.join(out, packing), packing, run, common_meta, common_batches, floor,
                                   plan.alarm_warmup_steps)
        final = arms[packing]["final"]
        print(f"[compare] {packing}: val {final['val_loss']:.4f} (own set), {final['val_loss_common']:.4f} (common set), "
              f"floor {floor:.4f}, {final['ms_per_step']:.1f} ms/step", flush=True)

    report = build_report(plan.settings(), command, arms, common)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as file:
        file.write(markdown(report))
    if not plot(report, os.path.join(out, "report.png")):
        print("[compare] matplotlib is not installed (pip install 'linepack[plots]'): report.png skipped", file=sys.stderr)
    comparison = report["comparison"]
    print(f"[compare] lines/fixed on the common set {comparison['val_loss_common_lines_over_fixed']:.4f}; "
          f"report in {out}/report.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
