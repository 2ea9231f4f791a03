"""The local stack launcher (``python -m trainer.stack``) with real processes on 127.0.0.1.

A tiny model on short rows trains for a few dozen CPU steps; a producer is killed and training
goes on; a producer started by hand (from the command the launcher prints) joins and is counted;
SIGINT stops every process the launcher started; a finished trainer ends the stack.
"""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.processes import Diagnostics, Process, free_port, module_argv

TINY_DATA = "--block-size 32 --rows-per-message 8"
TINY_MODEL = ("--batch-size 8 --n-layer 1 --n-head 2 --n-embd 32 --eval-interval 20 --eval-batches 2 "
              "--log-interval 5 --warmup-iters 5 --device cpu")
DIAGNOSTICS_KEYS = {"step", "meta", "loss", "batch", "cumulative", "attention_probe", "stream", "alarms"}
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children in other sessions included), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Launcher:
    """``python -m trainer.stack`` in its own session (a :class:`Process`), its trainer's
    ``GET /diagnostics``, and the pids of what it started."""

    def __init__(self, tmp_path: Path, *arguments: str):
        http_port, self.zmq_port = free_port(), free_port()
        self.http = f"http://127.0.0.1:{http_port}"
        self.child = Process("stack", module_argv(
            "trainer.stack", "--port", self.zmq_port, "--http-port", http_port, "--out-dir", tmp_path / "run",
            f"--producer-args={TINY_DATA}", f"--trainer-args={TINY_MODEL}", *arguments), new_session=True)
        self.process = self.child.popen
        self.lines = self.child.lines
        self.diagnostics = Diagnostics(http_port, self.child, poll_s=0.25)
        self.started: set[int] = set()

    def output(self) -> str:
        return self.child.output(60)

    def wait_for_line(self, text: str, timeout: float) -> str:
        return self.child.wait_for_line(text, timeout)

    def pid_of(self, name: str) -> int:
        line = self.wait_for_line(f"[stack] {name} pid ", 10)
        return int(line.split(" pid ", 1)[1].split(":", 1)[0])

    def wait_for(self, condition, what: str, timeout: float = START_TIMEOUT_S) -> dict:
        """Poll /diagnostics until ``condition(snapshot)`` holds; return that snapshot."""
        return self.diagnostics.wait_for(condition, what, timeout)

    def remember_children(self) -> None:
        self.started |= descendants(self.process.pid)

    def cleanup(self) -> None:
        """Whatever a failed test left running: the launcher, then anything it started."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stack_does_not_import_producer():
    tree = ast.parse((ROOT / "trainer" / "stack.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "producer" not in imported


def test_stack_survives_a_lost_producer_counts_a_new_one_and_stops_on_sigint(tmp_path):
    launcher = Launcher(tmp_path, "--producers", "2", "--max-iters", "100000")
    replacement = None
    try:
        first = launcher.wait_for(lambda s: s["step"] >= 20, "20 training steps")
        assert DIAGNOSTICS_KEYS <= set(first), f"missing {DIAGNOSTICS_KEYS - set(first)}"
        assert {"0", "1"} <= set(first["stream"]["producers"])
        assert any(line.startswith("[trainer] ") for line in launcher.lines), "trainer log not relayed"
        launcher.wait_for_line(f"[stack] diagnostics: curl {launcher.http}/diagnostics", 1)
        launcher.remember_children()

        victim = launcher.pid_of("producer-0")
        os.kill(victim, signal.SIGKILL)
        launcher.wait_for_line(f"producer-0 (pid {victim}) was killed by SIGKILL; not restarted", 10)
        killed_at = launcher.diagnostics.get()["step"]
        launcher.wait_for(lambda s: s["step"] >= killed_at + 10, "10 more steps with one producer")

        hint = launcher.wait_for_line("[stack] add a producer from another shell: ", 1)
        command = shlex.split(hint.split("from another shell: ", 1)[1])
        assert command[command.index("--producer-id") + 1] == "2"
        replacement = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        joined = launcher.wait_for(
            lambda s: s["stream"]["producers"].get("2", {}).get("messages", 0) > 0,
            "the replacement producer's messages")
        assert len(joined["stream"]["producers"]) == 3
        assert joined["stream"]["rejected_total"] == 0

        launcher.remember_children()
        started = set(launcher.started)
        assert len(started) >= 2, "the trainer and the surviving producer"
        stop_sent = time.monotonic()
        launcher.process.send_signal(signal.SIGINT)
        assert launcher.process.wait(STOP_TIMEOUT_S) == 128 + signal.SIGINT
        assert time.monotonic() - stop_sent < STOP_TIMEOUT_S
        assert not [pid for pid in started if alive(pid)], "the launcher left processes behind"
        assert replacement.poll() is None, "the launcher must only stop what it started"
    finally:
        if replacement is not None:
            replacement.kill()
            replacement.wait()
        launcher.cleanup()


def test_stack_ends_when_the_trainer_finishes(tmp_path):
    launcher = Launcher(tmp_path, "--producers", "1", "--max-iters", "10")
    try:
        launcher.wait_for_line("[stack] trainer pid ", 10)
        deadline = time.monotonic() + START_TIMEOUT_S
        while launcher.process.poll() is None and time.monotonic() < deadline:
            launcher.remember_children()
            time.sleep(0.2)
        assert launcher.process.poll() == 0, launcher.output()
        launcher.wait_for_line("[stack] trainer exited with code 0; stack stopped", 2)
        assert launcher.started, "no child was ever seen"
        assert not [pid for pid in launcher.started if alive(pid)]
    finally:
        launcher.cleanup()

    # The same --out-dir again, without --resume: refused, the first run's files as they were.
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    again = Launcher(tmp_path, "--producers", "1", "--max-iters", "20")
    try:
        assert again.process.wait(START_TIMEOUT_S) == 2, again.output()
        assert "holds an earlier run (ckpt.pt and metrics.jsonl) and --resume was not given" in again.output()
    finally:
        again.cleanup()
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_lone_flag_passes_through_without_the_equals_form():
    from trainer import stack

    args = stack.parse_args(["--trainer-args", "--resume", "--producer-args", "--supervise-sep", "--max-iters", "5"])
    assert args.trainer_args == ("--resume",) and args.producer_args == ("--supervise-sep",) and args.max_iters == 5
    assert stack.trainer_command(args, "runs/x")[-1] == "--resume"
    assert stack.producer_command(args, "0")[-1] == "--supervise-sep"
    assert stack.asks_to_resume(args)
    assert not stack.asks_to_resume(stack.parse_args(["--trainer-args", "--threads 2"]))


def test_the_default_run_directory_never_holds_an_earlier_run(tmp_path, monkeypatch):
    from trainer import stack

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LINEPACK_RESUME", raising=False)
    assert stack.run_directory(stack.parse_args([]))[0] == os.path.join("runs", "stack")
    (tmp_path / "runs" / "stack").mkdir(parents=True)
    assert stack.run_directory(stack.parse_args([]))[0] == os.path.join("runs", "stack")  # empty: no earlier run
    (tmp_path / "runs" / "stack" / "metrics.jsonl").write_text('{"kind": "eval"}\n')
    directory, why = stack.run_directory(stack.parse_args([]))
    assert directory == os.path.join("runs", "stack-2")
    assert why.startswith(f"run directory {directory}: {os.path.join('runs', 'stack')} holds an earlier run")
    (tmp_path / "runs" / "stack-2").mkdir()
    (tmp_path / "runs" / "stack-2" / "ckpt.pt").write_bytes(b"a checkpoint")
    assert stack.run_directory(stack.parse_args([]))[0] == os.path.join("runs", "stack-3")
    assert stack.run_directory(stack.parse_args(["--trainer-args", "--resume"]))[0] == os.path.join("runs", "stack-2")
    assert stack.run_directory(stack.parse_args(["--out-dir", "mine"]))[0] == "mine"


def test_the_trainer_gets_the_cores_the_producers_leave(monkeypatch):
    from trainer import stack

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [stack.trainer_threads(n) for n in (0, 2, 7, 8, 12)] == [8, 6, 1, 1, 1]
    args = stack.parse_args(["--producers", "3", "--trainer-args", "--threads 2"])
    command = stack.trainer_command(args, "runs/x")
    assert command[command.index("--threads") + 1] == "5"
    assert command[-2:] == ["--threads", "2"]  # passed-through flags come last and win
