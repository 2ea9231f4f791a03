"""Steps until the model leaves the context-free plateau, per block size x batch size x seed (docs/PLATEAU.md).

    python benchmarks/plateau_sweep.py --corpus data/tinyshakespeare.txt --out runs/sweep
        [--cells 128x32,256x16,512x8] [--seeds 0,1,2] [--max-iters 600] [--eval-interval 50]
        [--threads 1] [--keep] [--before JSON] [--quick] [-- EXTRA COMPARE FLAGS]

Each cell and seed is one ``python -m trainer.compare`` run (both packings, the real producer ->
ZeroMQ -> trainer path, policy ``uniform``, ``--eval-samples 0``, ``--device cpu``) in
``OUT/b{BLOCK}x{BATCH}-s{SEED}``; flags after ``--`` go to every run (a model or optimizer
setting under test). The runs go one after the other, each with ``OMP_NUM_THREADS=--threads``
(compare's processes follow it), importing this tree's code.

From each ``report.json``, per arm: the step at which it leaves the plateau, i.e. its first
evaluation (own val set, after training started) at least ``--margin`` nats under the
context-free floor (``never`` within the budget), and its final val loss on the common held-out
set. Writes ``OUT/plateau_sweep.md`` (the table) and ``OUT/plateau_sweep.json``, and prints the
JSON. ``--keep`` reuses a run whose ``report.json`` is already there; ``--before JSON`` (an
earlier sweep's ``plateau_sweep.json``) puts its numbers next to these in the table.
``--quick``: one tiny cell of the built-in corpus, a few steps (a smoke test; its numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("fixed", "lines")
QUICK_FLAGS = ["--rows-per-message", "8", "--eval-batches", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
               "--warmup-iters", "2", "--log-interval", "3", "--poll-s", "0.2"]


def cells(text: str) -> list[tuple[int, int]]:
    """``"128x32,256x16"`` -> ``[(128, 32), (256, 16)]`` (block size x batch size)."""
    try:
        return [tuple(int(part) for part in cell.split("x")) for cell in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BLOCKxBATCH[,BLOCKxBATCH...]") from None


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def leave_step(val: list[dict[str, Any]], floor: float, margin: float) -> int | None:
    """The first evaluation step with val loss <= floor - margin (None: never)."""
    return next((point["step"] for point in val if point["step"] > 0 and point["val_loss"] <= floor - margin), None)


def summarize(report: dict[str, Any], margin: float) -> dict[str, Any]:
    """Per arm: the step it leaves the plateau, its final common-set val loss and its val curve."""
    floor = report["context_free_floor"]
    arms = {}
    for name in ARMS:
        arm = report["arms"][name]
        arms[name] = {
            "leave_step": leave_step(arm["val"], floor, margin),
            "val_loss_common": arm["final"]["val_loss_common"],
            "below_floor_common": arm["final"]["below_floor_common"],
            "context_blind_common": arm["context_blind_common"]["active"],
            "ms_per_step": arm["final"]["ms_per_step"],
            "val": [[point["step"], round(point["val_loss"], 4)] for point in arm["val"]],
        }
    return {"floor": floor, "arms": arms}


def run_cell(args: argparse.Namespace, block: int, batch: int, seed: int, extra: list[str]) -> dict[str, Any]:
    out = os.path.join(args.out, f"b{block}x{batch}-s{seed}")
    report_path = os.path.join(out, "report.json")
    command = [sys.executable, "-m", "trainer.compare", "--out", out, "--block-size", str(block), "--batch-size", str(batch),
               "--policy", "uniform", "--seed", str(seed), "--max-iters", str(args.max_iters),
               "--eval-interval", str(args.eval_interval), "--eval-samples", "0", "--device", "cpu",
               "--arm-timeout-s", str(args.arm_timeout_s)]
    if args.corpus:
        command += ["--corpus", args.corpus]
    command += extra
    started = time.monotonic()
    if not (args.keep and os.path.exists(report_path)):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # this tree's code
        os.makedirs(out, exist_ok=True)
        print(f"[sweep] {shlex.join(command)}", file=sys.stderr, flush=True)
        with open(os.path.join(out, "compare.log"), "w", encoding="utf-8") as log:
            completed = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if completed.returncode != 0:
            raise RuntimeError(f"compare failed ({completed.returncode}) for block {block} batch {batch} seed {seed}; "
                               f"see {out}/compare.log")
    with open(report_path, encoding="utf-8") as file:
        report = json.load(file)
    result = {"cell": f"{block}x{batch}", "block_size": block, "batch_size": batch, "seed": seed,
              "command": report["command"], "wall_s": round(time.monotonic() - started, 1), **summarize(report, args.margin)}
    arms = result["arms"]
    print(f"[sweep] block {block} batch {batch} seed {seed}: "
          + "; ".join(f"{name} leaves at {show_step(arms[name]['leave_step'])}, common {arms[name]['val_loss_common']:.4f}"
                      for name in ARMS), file=sys.stderr, flush=True)
    return result


def show_step(step: int | None) -> str:
    return "never" if step is None else str(step)


def markdown(sweep: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """The table: per cell and seed, each arm's step of leaving the plateau and final common-set val loss;
    with ``before`` (an earlier sweep's JSON), its numbers for the same cell and seed side by side."""
    floor = sweep["results"][0]["floor"] if sweep["results"] else float("nan")
    lines = [
        f"Budget {sweep['max_iters']} steps, eval every {sweep['eval_interval']}; leaves = first eval (own val set) "
        f"≤ floor − {sweep['margin']:g} nats; floor {floor:.4f}; extra flags: `{shlex.join(sweep['extra']) or 'none'}`.",
        "",
    ]
    if before is None:
        lines += ["| block × batch | seed | fixed: leaves at | fixed: final val (common) | lines: leaves at | lines: final val (common) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
    else:
        lines += [f"Before: extra flags `{shlex.join(before['extra']) or 'none'}`. Each cell: leaves at / final val (common).",
                  "",
                  "| block × batch | seed | fixed, before | fixed, after | lines, before | lines, after |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        earlier = {(result["cell"], result["seed"]): result for result in before["results"]}
    for result in sweep["results"]:
        arms = result["arms"]
        if before is None:
            cells = [f"{show_step(arms[name]['leave_step'])} | {arms[name]['val_loss_common']:.4f}" for name in ARMS]
        else:
            old = earlier.get((result["cell"], result["seed"]))
            cells = [" | ".join(f"{show_step(run['arms'][name]['leave_step'])} / {run['arms'][name]['val_loss_common']:.4f}"
                                if run else "–" for run in (old, result)) for name in ARMS]
        lines.append(f"| {result['block_size']} × {result['batch_size']} | {result['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=None, help="passed to compare (none: the built-in corpus)")
    parser.add_argument("--out", default="runs/plateau-sweep", help="one folder per run goes here")
    parser.add_argument("--cells", type=cells, default=cells("128x32,256x16,512x8"), help="BLOCKxBATCH,...")
    parser.add_argument("--seeds", type=ints, default=ints("0,1,2"))
    parser.add_argument("--max-iters", type=int, default=600)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--margin", type=float, default=0.1, help="nats under the floor that count as leaving it")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--arm-timeout-s", type=float, default=3600)
    parser.add_argument("--keep", action="store_true", help="reuse runs whose report.json exists")
    parser.add_argument("--before", default=None, metavar="JSON",
                        help="an earlier sweep's plateau_sweep.json: the table shows its numbers next to these")
    parser.add_argument("--quick", action="store_true", help="one tiny cell, a few steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.seeds, args.max_iters, args.eval_interval, args.corpus = [(32, 8)], [0], 6, 3, None
        args.arm_timeout_s = 120
        extra = QUICK_FLAGS + extra
    before = None
    if args.before:
        with open(args.before, encoding="utf-8") as file:
            before = json.load(file)
    results = [run_cell(args, block, batch, seed, extra) for block, batch in args.cells for seed in args.seeds]
    sweep = {"corpus": args.corpus, "max_iters": args.max_iters, "eval_interval": args.eval_interval, "margin": args.margin,
             "threads": args.threads, "extra": extra, "results": results}
    os.makedirs(args.out, exist_ok=True)
    sweep["markdown"] = os.path.join(args.out, "plateau_sweep.md")
    with open(sweep["markdown"], "w", encoding="utf-8") as file:
        file.write(markdown(sweep, before))
    with open(os.path.join(args.out, "plateau_sweep.json"), "w", encoding="utf-8") as file:
        json.dump(sweep, file, indent=1)
    print(json.dumps(sweep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
