"""Exactly-once data, shown with real processes on 127.0.0.1 (docs/SPEC.md §2.8; the issue's must-show).

Three runs of ``python -m trainer`` with the same seed, ``--device cpu`` and ``--threads 1``:

1. ``baseline``: fed by one producer, never interrupted;
2. ``elastic``: fed by three producers; one is killed with SIGKILL at a third of the steps and
   started again at 7/12 of them;
3. ``resumed``: fed by one producer; the trainer is killed with SIGKILL right after its
   checkpoint at half the steps, then started again with ``--resume always``.

It prints one JSON object: for each run the train and val losses at every logged step (from
``metrics.jsonl``), and whether they equal the baseline's (all of them for ``elastic``; from the
step after the checkpoint on for ``resumed``). Exit status 0 when both are identical.

    python benchmarks/exactly_once.py --steps 120 --work /tmp/exactly-once
    python benchmarks/exactly_once.py --steps 120 --corpus ../shared/data/tinyshakespeare.txt

The defaults are the README's CPU model; ``--tiny`` uses a one-layer model (the test does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.endpoints import free_port  # noqa: E402

TINY_MODEL = ["--batch-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--warmup-iters", "5",
              "--eval-batches", "2", "--probe-interval", "0"]
TINY_DATA = ["--block-size", "32", "--rows-per-message", "8"]


class Child:
    """A ``python -m`` child whose merged output is collected line by line."""

    def __init__(self, args: list[str], log: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = open(log, "a")  # noqa: SIM115 - closed in wait()
        self.popen = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)
            self.log.write(line)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 600) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        self.log.close()
        return code


def losses(out_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {"train": ..., "val": ...} from a run's metrics.jsonl (train losses at log steps)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train" and row.get("log"):
            by_step.setdefault(row["step"], {})["train"] = row["train_loss"]
        elif row.get("kind") == "eval":
            by_step.setdefault(row["step"], {})["val"] = row["val_loss"]
    return dict(sorted(by_step.items()))


class Run:
    """One trainer run directory, with its own port, and the producers that feed it."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.out_dir = Path(args.work) / name
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.out_dir.mkdir(parents=True)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.producers: list[Child] = []

    def trainer(self, *extra: str) -> Child:
        a = self.args
        model = TINY_MODEL if a.tiny else []
        return Child(["trainer", "--bind", self.endpoint, "--out-dir", str(self.out_dir), "--max-iters", str(a.steps),
                      "--eval-interval", str(a.eval_interval), "--log-interval", str(a.log_interval), "--device", "cpu",
                      "--threads", "1", "--http-port", "0", "--eval-samples", "0", "--seed", "0", *model, *extra],
                     self.out_dir / "trainer.log")

    def producer(self, index: int) -> Child:
        corpus = ["--corpus", self.args.corpus] if self.args.corpus else []
        child = Child(["producer", "run", "--connect", self.endpoint, "--producer-id", f"{self.name}-{index}",
                       "--seed", "0", *corpus, *(TINY_DATA if self.args.tiny else [])], self.out_dir / f"producer-{index}.log")
        self.producers.append(child)
        return child

    def finish(self, trainer: Child) -> None:
        code = trainer.wait()
        for producer in self.producers:
            if producer.popen.poll() is None:
                producer.popen.send_signal(signal.SIGTERM)
                producer.wait(30)
        if code != 0:
            raise RuntimeError(f"{self.name}: the trainer exited {code}; see {self.out_dir}/trainer.log")


def wait_for_step(run: Run, trainer: Child, step: int, timeout: float) -> None:
    """Until the run's metrics.jsonl has a row of ``step`` or later (or the trainer has ended)."""
    deadline = time.monotonic() + timeout
    path = run.out_dir / "metrics.jsonl"
    while time.monotonic() < deadline and trainer.popen.poll() is None:
        if path.exists() and any(json.loads(line).get("step", -1) >= step for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.02)


def baseline(args: argparse.Namespace) -> Path:
    run = Run("baseline", args)
    trainer = run.trainer()
    run.producer(0)
    run.finish(trainer)
    return run.out_dir


def elastic(args: argparse.Namespace) -> Path:
    run = Run("elastic", args)
    trainer = run.trainer()
    victim = [run.producer(i) for i in range(3)][1]
    wait_for_step(run, trainer, args.steps // 3, args.timeout)
    victim.kill()
    wait_for_step(run, trainer, args.steps * 7 // 12, args.timeout)
    run.producer(1)
    run.finish(trainer)
    return run.out_dir


def resumed(args: argparse.Namespace) -> Path:
    run = Run("resumed", args)
    checkpoint_at = args.steps // 2 // args.eval_interval * args.eval_interval
    trainer = run.trainer()
    run.producer(0)
    _wait_for_checkpoint(run.out_dir, checkpoint_at, args.timeout)
    trainer.kill()
    run.finish(run.trainer("--resume", "always"))
    return run.out_dir


def _wait_for_checkpoint(out_dir: Path, step: int, timeout: float) -> None:
    """Until metrics.jsonl has the eval row of ``step`` (written after the checkpoint is in place)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line).get("kind") == "eval" and json.loads(line)["step"] == step
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.02)
    raise RuntimeError(f"no checkpoint of step {step} in {out_dir}")


def compare(base: dict[int, dict[str, float]], other: dict[int, dict[str, float]], after: int = 0) -> dict:
    steps = [step for step in base if step > after]
    differing = [step for step in steps if other.get(step) != base[step]]
    return {"steps_compared": len(steps), "identical": not differing and bool(steps), "differing_steps": differing[:10]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--corpus", default=None, help="a corpus for the producers (default: the built-in one)")
    parser.add_argument("--work", default="runs/exactly-once")
    parser.add_argument("--tiny", action="store_true", help="a one-layer model on short rows")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for any one event")
    args = parser.parse_args(argv)
    started = time.monotonic()
    base = losses(baseline(args))
    elastic_losses = losses(elastic(args))
    resumed_losses = losses(resumed(args))
    checkpoint_at = args.steps // 2 // args.eval_interval * args.eval_interval
    report = {
        "steps": args.steps,
        "baseline": base,
        "elastic": compare(base, elastic_losses),
        "resumed": {**compare(base, resumed_losses, after=checkpoint_at), "checkpoint_step": checkpoint_at},
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report))
    return 0 if report["elastic"]["identical"] and report["resumed"]["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
