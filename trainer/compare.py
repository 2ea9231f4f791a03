"""``python -m trainer.compare``: the fixed-window baseline against line-aligned packing, A/B (SPEC §9).

    python -m trainer.compare --corpus FILE --out DIR [--policy uniform|bert] [--max-iters N]
                              [--loss-weighting none|inverse-t] [model, optimizer and data flags]

Two arms that differ only in ``--packing``: ``fixed`` (the baseline) and ``lines`` (line-aligned
rows ending in [SEP]). Each arm is a real ``python -m trainer`` process fed by real
``python -m producer run`` processes over ZeroMQ on 127.0.0.1, with the same model, optimizer,
seed, batch size, block size and steps (so the same B*T*steps position budget), corruption
policy and loss weighting. The arms run one after the other, so they do not share the CPU.

Like-for-like number: before the arms, ``python -m producer record --split val --packing lines``
writes one common held-out set (the val lines, line-aligned, corrupted under ``--common-seed``).
After each arm its final checkpoint is evaluated on that set, and the attention probe and the
``context_blind`` alarm (trainer.probe, trainer.alarms) are computed on it. Each arm's own val
loss (its own val set, from its metrics.jsonl) is reported too.

Writes to ``--out``: ``report.json`` (settings, commands, the per-log-step train loss and the
per-eval val loss of both arms, the context-free floor, final numbers, probe and alarms),
``report.md`` (the table), ``report.png`` (curves and floor; skipped with a message when
matplotlib, the ``plots`` extra, is missing), ``common_val.lps``, and per arm ``fixed/`` and
``lines/``: the trainer's run directory (metrics.jsonl, ckpt.pt), ``trainer.log``,
``producer-N.log`` and ``diagnostics.json`` (the last ``GET /diagnostics`` answer seen while it
trained). Exit status 0 when both arms finished, 1 otherwise (the failing log is named).

Producers are started as processes; this module never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

import numpy as np
import torch

from shared.meta import StreamMeta
from shared.recording import RecordingReader
from shared.wire import decode
from trainer.alarms import AlarmInputs, AlarmSettings, context_blind
from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from trainer.floor import context_free_floor
from trainer.model import BidirectionalTransformer, ModelConfig
from trainer.probe import attention_probe, build_probe_set, summed_loss
from trainer.train import METRICS_NAME

ARMS = ("fixed", "lines")  # the baseline first
COMMON_NAME = "common_val.lps"
# The producer cuts its val set at this many rows (producer.stream.MAX_VAL_ROWS); recording
# ceil(rows / rows_per_message) val messages covers it, and duplicates are dropped by val_index.
PRODUCER_MAX_VAL_ROWS = 256
WAIT_TIMEOUT_S = 300  # the trainer gives up when no producer data arrives within this (at start or mid-run)
STOP_TIMEOUT_S = 5.0
WITHIN = 0.03  # the lines arm's common-set val loss may exceed the baseline's by at most 3 %
BELOW_FLOOR = 0.5  # both arms must end at least this many nats below the context-free floor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="report folder (created; arms go in OUT/fixed and OUT/lines)")
    parser.add_argument("--arm-timeout-s", type=float, default=None, help="stop an arm that runs longer than this (default: no limit)")
    parser.add_argument("--producers", type=int, default=1, help="producer processes per arm (default: 1)")
    parser.add_argument("--poll-s", type=float, default=2.0, help="seconds between GET /diagnostics polls (default: 2)")

    data = parser.add_argument_group("data (both arms and the common set)")
    data.add_argument("--corpus", metavar="PATH", default=None, help="text file or folder (default: the built-in corpus)")
    data.add_argument("--block-size", type=int, default=128)
    data.add_argument("--rows-per-message", type=int, default=16)
    data.add_argument("--policy", choices=("uniform", "bert"), default="uniform")
    data.add_argument("--mask-prob", type=float, default=0.15, help="bert: supervised probability (default: 0.15)")
    data.add_argument("--val-fraction", type=float, default=0.1)
    data.add_argument("--seed", type=int, default=0, help="data and training seed of both arms (default: 0)")
    data.add_argument("--common-seed", type=int, default=1, help="corruption seed of the common held-out set (default: 1)")

    loop = parser.add_argument_group("training (both arms)")
    loop.add_argument("--batch-size", type=int, default=32)
    loop.add_argument("--max-iters", type=int, default=1500)
    loop.add_argument("--eval-interval", type=int, default=100)
    loop.add_argument("--eval-batches", type=int, default=0, help="first N val batches; 0 = the whole val set")
    loop.add_argument("--log-interval", type=int, default=10)
    loop.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    loop.add_argument("--lr", type=float, default=2e-3)
    loop.add_argument("--min-lr", type=float, default=2e-4)
    loop.add_argument("--warmup-iters", type=int, default=100)
    loop.add_argument("--weight-decay", type=float, default=0.1)
    loop.add_argument("--grad-clip", type=float, default=1.0)
    loop.add_argument("--loss-weighting", choices=("none", "inverse-t"), default="none")
    loop.add_argument("--alarm-warmup-steps", type=int, default=AlarmSettings.warmup_steps)

    model = parser.add_argument_group("model (both arms)")
    model.add_argument("--n-layer", type=int, default=4)
    model.add_argument("--n-head", type=int, default=4)
    model.add_argument("--n-embd", type=int, default=128)
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--positions", choices=("learned", "rotary"), default="learned")
    return parser


# ---- command lines ----------------------------------------------------------------------

def data_flags(args: argparse.Namespace) -> list[str]:
    """The producer data flags both arms and the common set share (not packing, not seed)."""
    flags = ["--block-size", str(args.block_size), "--rows-per-message", str(args.rows_per_message),
             "--policy", args.policy, "--mask-prob", str(args.mask_prob), "--val-fraction", str(args.val_fraction)]
    return flags + (["--corpus", args.corpus] if args.corpus is not None else [])


def producer_command(args: argparse.Namespace, packing: str, endpoint: str, producer_id: int) -> list[str]:
    return [sys.executable, "-m", "producer", "run", "--connect", endpoint, "--producer-id", str(producer_id),
            "--status-every", "60", "--packing", packing, "--seed", str(args.seed), *data_flags(args)]


def trainer_command(args: argparse.Namespace, out_dir: str, endpoint: str, http_port: int) -> list[str]:
    flags = {
        "batch-size": args.batch_size, "max-iters": args.max_iters, "eval-interval": args.eval_interval,
        "eval-batches": args.eval_batches, "log-interval": args.log_interval, "device": args.device,
        "seed": args.seed, "lr": args.lr, "min-lr": args.min_lr, "warmup-iters": args.warmup_iters,
        "weight-decay": args.weight_decay, "grad-clip": args.grad_clip, "loss-weighting": args.loss_weighting,
        "n-layer": args.n_layer, "n-head": args.n_head, "n-embd": args.n_embd, "dropout": args.dropout,
        "positions": args.positions, "alarm-warmup-steps": args.alarm_warmup_steps,
    }
    command = [sys.executable, "-m", "trainer", "--bind", endpoint, "--out-dir", out_dir,
               "--http-host", "127.0.0.1", "--http-port", str(http_port), "--wait-timeout", str(WAIT_TIMEOUT_S),
               "--data-timeout", str(WAIT_TIMEOUT_S)]
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    return command


def record_command(args: argparse.Namespace, path: str) -> list[str]:
    messages = -(-PRODUCER_MAX_VAL_ROWS // args.rows_per_message)
    return [sys.executable, "-m", "producer", "record", "--out", path, "--messages", str(messages), "--split", "val",
            "--packing", "lines", "--seed", str(args.common_seed), *data_flags(args)]


# ---- processes --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(argv: list[str], log_path: str) -> subprocess.Popen:
    """Start ``argv`` in its own process group, its output (stdout and stderr) to ``log_path``."""
    with open(log_path, "w", encoding="utf-8") as log_file:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, wait up to STOP_TIMEOUT_S, then SIGKILL what is left."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


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


def run_arm(args: argparse.Namespace, packing: str) -> dict[str, Any]:
    """Train one arm through producer processes -> ZeroMQ -> trainer process; its commands and
    the last diagnostics seen. Raises RuntimeError when the trainer fails or times out."""
    arm_dir = os.path.join(args.out, packing)
    os.makedirs(arm_dir, exist_ok=True)
    endpoint, http_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    trainer_argv = trainer_command(args, arm_dir, endpoint, http_port)
    producer_argvs = [producer_command(args, packing, endpoint, i) for i in range(args.producers)]
    print(f"[compare] {packing}: {shlex.join(trainer_argv)}", flush=True)
    trainer = start(trainer_argv, os.path.join(arm_dir, "trainer.log"))
    producers = [start(argv, os.path.join(arm_dir, f"producer-{i}.log")) for i, argv in enumerate(producer_argvs)]
    deadline = None if args.arm_timeout_s is None else time.monotonic() + args.arm_timeout_s
    last_diagnostics = None
    try:
        while trainer.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the {packing} arm ran longer than {args.arm_timeout_s:.0f} s; see {arm_dir}/trainer.log")
            time.sleep(args.poll_s)
            last_diagnostics = get_diagnostics(http_port) or last_diagnostics
    finally:
        stop([trainer, *producers])
    if trainer.returncode != 0:
        log_path = os.path.join(arm_dir, "trainer.log")
        raise RuntimeError(f"the {packing} trainer exited with {trainer.returncode}; {log_path} ends:\n{log_tail(log_path)}")
    with open(os.path.join(arm_dir, "diagnostics.json"), "w", encoding="utf-8") as file:
        json.dump(last_diagnostics, file, indent=1)
    return {
        "commands": {"trainer": shlex.join(trainer_argv), "producers": [shlex.join(argv) for argv in producer_argvs]},
        "diagnostics": last_diagnostics,
    }


# ---- the common held-out set --------------------------------------------------------------

def load_val_recording(path: str, batch_size: int) -> tuple[StreamMeta, list[dict[str, torch.Tensor]]]:
    """The val messages of a recording, each val_index once, in val_index order, as batches of
    ``batch_size`` rows: ``x``, ``y``, ``attention_mask`` int64 (B, T) on the CPU."""
    messages: dict[int, Any] = {}
    meta = None
    for frames in RecordingReader(path):
        message = decode(frames)
        if message.split != "val":
            continue
        if meta is not None and message.meta.digest != meta.digest:
            raise ValueError(f"{path} mixes streams: {meta.differences(message.meta)[:1]}")
        meta = message.meta
        messages.setdefault(message.val_index, message.tensors)
    if meta is None:
        raise ValueError(f"{path} holds no val messages")
    rows = {name: np.concatenate([messages[i][name] for i in sorted(messages)]).astype(np.int64)
            for name in ("x", "y", "attention_mask")}
    batches = [{name: torch.from_numpy(array[start : start + batch_size]) for name, array in rows.items()}
               for start in range(0, len(rows["x"]), batch_size)]
    return meta, batches


def load_model(arm_dir: str) -> tuple[BidirectionalTransformer, StreamMeta, int]:
    """The arm's final model (eval mode, CPU), the stream meta it trained on, and its step."""
    checkpoint = load_checkpoint(os.path.join(arm_dir, CHECKPOINT_NAME), "cpu")
    model = BidirectionalTransformer(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), StreamMeta.from_dict(checkpoint["meta"]), int(checkpoint["step"])


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Mean cross-entropy (nats) over the supervised positions of ``batches``, and their count."""
    total, count = 0.0, 0
    for batch in batches:
        batch_total, batch_count = summed_loss(model, batch["x"], batch["attention_mask"], batch["y"])
        total, count = total + batch_total, count + batch_count
    return total / max(count, 1), count


def evaluate_on_common(args: argparse.Namespace, arm_dir: str, common_meta: StreamMeta,
                       common: list[dict[str, torch.Tensor]], floor: float) -> dict[str, Any]:
    """Loss, attention probe and context_blind of the arm's final model on the common set, and
    the stream meta it trained on."""
    model, meta, step = load_model(arm_dir)
    if meta.vocab != common_meta.vocab or meta.block_size < common_meta.block_size:
        raise ValueError(f"{arm_dir} was trained on another vocabulary or a shorter block than the common set")
    loss, supervised = mean_loss(model, common)
    probe = attention_probe(model, build_probe_set(common))
    inputs = AlarmInputs(step=step, val_loss=loss, floor=floor, no_context_gap=probe["loss_no_context_minus_attn"])
    active, explanation = context_blind(inputs, AlarmSettings(warmup_steps=args.alarm_warmup_steps))
    return {"val_loss_common": loss, "supervised": supervised, "step": step, "probe": probe,
            "context_blind": {"active": active, "explanation": explanation}, "meta": meta}


# ---- the report -----------------------------------------------------------------------------

def read_metrics(arm_dir: str) -> dict[str, Any]:
    """Train curve (per log step), val curve (per eval), throughput and the summary of one arm."""
    with open(os.path.join(arm_dir, METRICS_NAME), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    summary = next(r for r in records if r["kind"] == "summary")
    timed = train[1:] or train  # the first interval holds start-up costs
    return {
        "train": [{"step": r["step"], "train_loss": r["train_loss"]} for r in train],
        "val": [{"step": r["step"], "val_loss": r["val_loss"]} for r in evals],
        "throughput": {
            "ms_per_step": statistics.median(r["ms_per_step"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "data_wait_pct": statistics.median(r["data_wait_pct"] for r in timed),
        },
        "summary": {key: summary.get(key) for key in ("steps", "train_loss", "val_loss", "wall_s")},
        "stream": {key: summary["stream"].get(key) for key in ("received", "accepted", "rejected_total", "gaps", "duplicates", "dropped_train")},
    }


def live_numbers(diagnostics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of the last /diagnostics answer the report keeps."""
    if not diagnostics:
        return None
    batch = diagnostics.get("batch") or {}
    return {
        "step": diagnostics["step"],
        "val_loss": diagnostics["loss"]["val"],
        "context_free_floor_val": diagnostics["loss"]["context_free_floor_val"],
        "valid_len_mean": (batch.get("valid_len") or {}).get("mean"),
        "supervised_per_token": batch.get("supervised_per_token"),
        "attention_probe": diagnostics.get("attention_probe"),
        "alarms": {alarm["name"]: {"active": alarm["active"], "explanation": alarm["explanation"]} for alarm in diagnostics["alarms"]},
    }


def build_report(args: argparse.Namespace, argv: list[str], arms: dict[str, dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    baseline, lines = arms["fixed"]["final"]["val_loss_common"], arms["lines"]["final"]["val_loss_common"]
    floor = common["context_free_floor"]
    return {
        "command": "python -m trainer.compare " + shlex.join(argv),
        "settings": dict(vars(args)),
        "context_free_floor": floor,
        "common_val": common,
        "arms": arms,
        "comparison": {
            "val_loss_common_lines_over_fixed": lines / baseline,
            "lines_within_3pct_of_fixed": lines <= baseline * (1 + WITHIN),
            "below_floor_nats": {name: floor - arm["final"]["val_loss_common"] for name, arm in arms.items()},
            "both_0p5_below_floor": all(floor - arm["final"]["val_loss_common"] >= BELOW_FLOOR for arm in arms.values()),
        },
    }


def arm_result(args: argparse.Namespace, packing: str, run: dict[str, Any], common_meta: StreamMeta,
               common_batches: list[dict[str, torch.Tensor]], floor: float) -> dict[str, Any]:
    arm_dir = os.path.join(args.out, packing)
    metrics = read_metrics(arm_dir)
    on_common = evaluate_on_common(args, arm_dir, common_meta, common_batches, floor)
    return {
        "packing": packing,
        "commands": run["commands"],
        "context_free_floor_val": context_free_floor(on_common["meta"], "val"),
        "train": metrics["train"],
        "val": metrics["val"],
        "final": {
            **metrics["summary"],
            "val_loss_common": on_common["val_loss_common"],
            "below_floor_common": floor - on_common["val_loss_common"],
            **metrics["throughput"],
        },
        "stream": metrics["stream"],
        "probe_common": on_common["probe"],
        "context_blind_common": on_common["context_blind"],
        "live_diagnostics": live_numbers(run["diagnostics"]),
    }


def markdown(report: dict[str, Any]) -> str:
    """report.md: the result table, the probe and alarm table, and the command."""
    settings, floor = report["settings"], report["context_free_floor"]
    lines = [
        "# Baseline (fixed windows) vs line-aligned packing",
        "",
        f"Corpus `{settings['corpus'] or 'built-in'}`, policy `{settings['policy']}`"
        + (f" ({settings['mask_prob']:.0%})" if settings["policy"] == "bert" else "")
        + f", loss weighting `{settings['loss_weighting']}`; {settings['n_layer']} layers x {settings['n_embd']}, "
        f"block {settings['block_size']}, batch {settings['batch_size']}, {settings['max_iters']} steps per arm, "
        f"lr {settings['lr']:g} -> {settings['min_lr']:g}, seed {settings['seed']}.",
        f"Context-free floor: **{floor:.4f}** nats. Common held-out set: {report['common_val']['rows']} line-aligned val rows, "
        f"{report['common_val']['supervised']} supervised positions (corruption seed {settings['common_seed']}).",
        "",
        "| arm | final train loss | final val loss (own val set) | final val loss (common set) | below floor (common) | ms/step | tokens/s | data wait % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, arm in report["arms"].items():
        final = arm["final"]
        lines.append(
            f"| {name} | {final['train_loss']:.4f} | {final['val_loss']:.4f} | **{final['val_loss_common']:.4f}** | "
            f"{final['below_floor_common']:.3f} | {final['ms_per_step']:.1f} | {final['tokens_per_s']:.0f} | {final['data_wait_pct']:.1f} |"
        )
    comparison = report["comparison"]
    lines += [
        "",
        f"lines / fixed on the common set: **{comparison['val_loss_common_lines_over_fixed']:.4f}** "
        f"(within 3 %: {'yes' if comparison['lines_within_3pct_of_fixed'] else 'NO'}; "
        f"both >= {BELOW_FLOOR} nats below the floor: {'yes' if comparison['both_0p5_below_floor'] else 'NO'}).",
        "tokens/s counts B*T positions, [PAD] included; ms/step and tokens/s are medians over the log intervals (evaluation excluded).",
        "",
        "Attention probe and `context_blind` on the common set (final checkpoint):",
        "",
        "| arm | loss, real mask | loss, no mask | loss, context hidden | hiding context costs | context_blind |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, arm in report["arms"].items():
        probe, alarm = arm["probe_common"], arm["context_blind_common"]
        lines.append(
            f"| {name} | {probe['loss_attn']:.4f} | {probe['loss_noattn']:.4f} | {probe['loss_no_context']:.4f} | "
            f"{probe['loss_no_context_minus_attn']:+.3f} | {'ACTIVE' if alarm['active'] else 'quiet'} |"
        )
    lines += ["", "Command:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> bool:
    """report.png: train and val curves of both arms and the floor; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(8, 5))
    colours = {"fixed": "tab:blue", "lines": "tab:orange"}
    for name, arm in report["arms"].items():
        train_steps = [point["step"] for point in arm["train"]]
        axes.plot(train_steps, [point["train_loss"] for point in arm["train"]], color=colours[name], alpha=0.35, linewidth=1,
                  label=f"{name}: train")
        axes.plot([point["step"] for point in arm["val"]], [point["val_loss"] for point in arm["val"]], color=colours[name],
                  marker="o", markersize=3, label=f"{name}: val (own set)")
        axes.plot([arm["final"]["steps"]], [arm["final"]["val_loss_common"]], color=colours[name], marker="*", markersize=12,
                  linestyle="none", label=f"{name}: val (common set) {arm['final']['val_loss_common']:.3f}")
    floor = report["context_free_floor"]
    axes.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"context-free floor {floor:.3f}")
    settings = report["settings"]
    axes.set(xlabel="step", ylabel="loss (nats, supervised positions)",
             title=f"fixed vs lines, policy {settings['policy']}, {settings['n_layer']}x{settings['n_embd']}, "
                   f"block {settings['block_size']}, batch {settings['batch_size']}")
    axes.set_ylim(top=max(floor + 0.6, min(4.5, axes.get_ylim()[1])))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Leave through SystemExit on SIGTERM, so run_arm's finally stops the arm's processes.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return compare(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def compare(args: argparse.Namespace, argv: list[str]) -> int:
    """Record the common set, run both arms, write the report; the exit status."""
    os.makedirs(args.out, exist_ok=True)
    common_path = os.path.join(args.out, COMMON_NAME)
    record = subprocess.run(record_command(args, common_path), capture_output=True, text=True)
    if record.returncode != 0:
        print(f"[compare] recording the common held-out set failed:\n{record.stderr}", file=sys.stderr)
        return 1
    common_meta, common_batches = load_val_recording(common_path, args.batch_size)
    floor = context_free_floor(common_meta, "val")
    common = {
        "path": common_path,
        "command": shlex.join(record_command(args, common_path)),
        "rows": sum(len(batch["x"]) for batch in common_batches),
        "supervised": int(sum(int((batch["y"] != common_meta.ignore_index).sum()) for batch in common_batches)),
        "context_free_floor": floor,
    }
    arms = {}
    for packing in ARMS:
        try:
            run = run_arm(args, packing)
        except RuntimeError as error:
            print(f"[compare] {error}", file=sys.stderr)
            return 1
        arms[packing] = arm_result(args, packing, run, common_meta, common_batches, floor)
        final = arms[packing]["final"]
        print(f"[compare] {packing}: val {final['val_loss']:.4f} (own set), {final['val_loss_common']:.4f} (common set), "
              f"floor {floor:.4f}, {final['ms_per_step']:.1f} ms/step", flush=True)

    report = build_report(args, argv, arms, common)
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as file:
        file.write(markdown(report))
    if not plot(report, os.path.join(args.out, "report.png")):
        print("[compare] matplotlib is not installed (pip install 'linepack[plots]'): report.png skipped", file=sys.stderr)
    comparison = report["comparison"]
    print(f"[compare] lines/fixed on the common set {comparison['val_loss_common_lines_over_fixed']:.4f}; "
          f"report in {args.out}/report.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
