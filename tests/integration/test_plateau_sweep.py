"""``benchmarks/plateau_sweep.py --quick`` runs one tiny cell through ``trainer.compare`` and writes its table;
``benchmarks/plateau_arm.py --quick`` trains one tiny arm in process (docs/PLATEAU.md). Nothing is timed or
judged here: the numbers of a few steps mean nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from helpers import ROOT


def sweep(*flags: str) -> dict:
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plateau_sweep.py"), "--quick", *flags],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout)


def test_plateau_sweep_quick(tmp_path):
    report = sweep("--out", str(tmp_path))
    [cell] = report["results"]
    assert (cell["block_size"], cell["batch_size"], cell["seed"]) == (32, 8, 0)
    assert set(cell["arms"]) == {"fixed", "lines"}
    for arm in cell["arms"].values():
        assert arm["leave_step"] is None or arm["leave_step"] in (3, 6)
        assert math.isfinite(arm["val_loss_common"]) and [step for step, _ in arm["val"]] == [0, 3, 6]
    assert "| 32 × 8 | 0 |" in (tmp_path / "plateau_sweep.md").read_text()

    # --keep reuses the run; --before puts an earlier sweep's numbers next to it.
    again = sweep("--out", str(tmp_path), "--keep", "--before", str(tmp_path / "plateau_sweep.json"))
    assert again["results"][0]["arms"] == cell["arms"]
    fixed = cell["arms"]["fixed"]
    shown = f"{'never' if fixed['leave_step'] is None else fixed['leave_step']} / {fixed['val_loss_common']:.4f}"
    assert f"| 32 × 8 | 0 | {shown} | {shown} |" in (tmp_path / "plateau_sweep.md").read_text()


def test_plateau_arm_quick():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plateau_arm.py"), "--quick", "--policy", "uniform",
                                "--positions", "learned", "--ratio-range", "0,0.5"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    run = json.loads(completed.stdout)
    assert (run["packing"], run["block_size"], run["batch_size"]) == ("lines", 32, 8)
    assert [step for step, _ in run["val"]] == [3, 6] and run["final_val"] == run["val"][-1][1]
    assert run["leave_step"] in ("never", 3, 6) and math.isfinite(run["floor"])


def test_plateau_arm_keeps_the_stage_tensor(tmp_path):
    """Under ``--policy stages`` the in-process source hands the trainer each row's stage, so the
    per-stage losses are logged (they vanished when the source dropped the tensor)."""
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plateau_arm.py"), "--quick", "--policy", "stages",
                                "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [record for record in records if record["kind"] == "eval" and not record["before_training"]]
    assert evals and all(record["val_loss_by_stage"] for record in evals)
    assert any(record.get("train_loss_by_stage") for record in records if record["kind"] == "train")
