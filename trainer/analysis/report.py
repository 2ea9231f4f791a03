"""The A/B report of ``trainer.compare``: each arm's curves and final numbers, the comparison,
``report.json`` (the document), ``report.md`` (the tables) and ``report.png`` (the curves)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any

import torch

from shared.meta import StreamMeta
from trainer.analysis.common_set import evaluate_on_common
from trainer.diagnostics.floor import context_free_floor
from trainer.loop.observers import METRICS_NAME

WITHIN = 0.03  # the lines arm's common-set val loss may exceed the baseline's by at most 3 %
BELOW_FLOOR = 0.5  # both arms must end at least this many nats below the context-free floor


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
            "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in timed),
        },
        "summary": {key: summary.get(key) for key in ("steps", "train_loss", "val_loss", "wall_s")},
        "stream": {key: summary["stream"].get(key)
                   for key in ("received", "accepted", "rejected_total", "gaps", "duplicates", "orders_reassigned")},
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


def build_report(settings: dict[str, Any], command: str, arms: dict[str, dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    """report.json: ``settings`` (every flag of the run), the command, the common set, both arms
    (:func:`arm_result`) and their comparison."""
    baseline, lines = arms["fixed"]["final"]["val_loss_common"], arms["lines"]["final"]["val_loss_common"]
    floor = common["context_free_floor"]
    return {
        "command": command,
        "settings": settings,
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


def arm_result(arm_dir: str, packing: str, run: dict[str, Any], common_meta: StreamMeta,
               common_batches: list[dict[str, torch.Tensor]], floor: float, alarm_warmup_steps: int) -> dict[str, Any]:
    """One arm's curves (metrics.jsonl), final numbers, stream counts, and its final checkpoint
    on the common set."""
    metrics = read_metrics(arm_dir)
    on_common = evaluate_on_common(arm_dir, common_meta, common_batches, floor, alarm_warmup_steps)
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
        "probe_common": dataclasses.asdict(on_common["probe"]),
        "context_blind_common": on_common["context_blind"],
        "live_diagnostics": live_numbers(run["diagnostics"]),
    }


def markdown(report: dict[str, Any]) -> str:
    """report.md: the result table, the probe and alarm table, and the command."""
    settings, floor = report["settings"], report["context_free_floor"]
    lines = [
        "# Baseline (fixed windows) vs line-aligned packing",
        "",
        f"Corpus `{settings['corpus'] or 'built-in'}`, policy `{report['common_val']['corruption']}`"
        f", loss weighting `{settings['loss_weighting']}`; {settings['n_layer']} layers x {settings['n_embd']} "
        f"({settings['positions']} positions), "
        f"block {settings['block_size']}, batch {settings['batch_size']}, {settings['max_iters']} steps per arm, "
        f"lr {settings['lr']:g} -> {settings['min_lr']:g}, seed {settings['seed']}.",
        f"Context-free floor: **{floor:.4f}** nats. Common held-out set: {report['common_val']['rows']} line-aligned val rows, "
        f"{report['common_val']['supervised']} supervised positions (corruption seed {settings['common_seed']}).",
        "",
        "| arm | final train loss | final val loss (own val set) | final val loss (common set) | below floor (common) "
        "| ms/step | tokens/s | data wait % |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, arm in report["arms"].items():
        final = arm["final"]
        lines.append(
            f"| {name} | {final['train_loss']:.4f} | {final['val_loss']:.4f} | **{final['val_loss_common']:.4f}** | "
            f"{final['below_floor_common']:.3f} | {final['ms_per_step']:.1f} | {final['tokens_per_s']:.0f} | "
            f"{100 * final['data_wait_fraction']:.1f} |"
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
             title=f"fixed vs lines, policy {report['common_val']['corruption']}, {settings['n_layer']}x{settings['n_embd']}, "
                   f"block {settings['block_size']}, batch {settings['batch_size']}")
    axes.set_ylim(top=max(floor + 0.6, min(4.5, axes.get_ylim()[1])))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
