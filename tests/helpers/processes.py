"""Real trainer and producer processes on 127.0.0.1 for the fault-matrix and Curve tests.

``Process`` wraps one ``python -m trainer`` / ``python -m producer run`` child: its merged
output is collected line by line in a thread, so a test can wait for a log line, read a
producer's ``summary {json}`` or the trainer's ``done: {json}`` line, and read its RSS.
``Diagnostics`` polls the trainer's ``GET /diagnostics``. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Short rows and a one-layer model: a CPU step takes milliseconds, a checkpoint every 10 steps.
TINY_DATA = ["--block-size", "32", "--rows-per-message", "8"]
TINY_MODEL = ["--batch-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--eval-interval", "10",
              "--eval-batches", "2", "--log-interval", "5", "--warmup-iters", "5", "--device", "cpu",
              "--probe-interval", "0"]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A child process whose stdout and stderr are collected into :attr:`lines`."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS="1")  # several processes share a few test cores
        self.popen = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self, last: int = 40) -> str:
        return f"--- {self.name} (pid {self.pid}) ---\n" + "\n".join(self.lines[-last:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_line(self, text: str, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if not self.alive():
                self._reader.join(2)
                if any(text in line for line in self.lines):
                    continue
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}\n{self.output()}")

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Waits for the exit (AssertionError after ``timeout``); returns the exit status."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s\n{self.output()}") from None
        self._reader.join(2)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        self.popen.send_signal(sig)
        return self.wait(timeout)

    def kill_if_alive(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(5)

    def json_line(self, prefix: str) -> dict | None:
        """The JSON after ``prefix`` on the last line that holds it (``"summary "``, ``"done: "``)."""
        found = [line.split(prefix, 1)[1] for line in self.lines if prefix in line]
        return json.loads(found[-1]) if found else None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"{self.name} has no VmRSS")


class Cluster:
    """Starts trainers and producers on one ZeroMQ port; whatever still runs at teardown is killed."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.processes: list[Process] = []

    def trainer(self, out_dir: Path, *flags: str, http_port: int | None = None) -> tuple[Process, Diagnostics]:
        http_port = http_port or free_port()
        argv = [sys.executable, "-m", "trainer", "--bind", self.endpoint, "--out-dir", str(out_dir),
                "--http-port", str(http_port), "--max-iters", "100000", *TINY_MODEL, *flags]
        process = Process("trainer", argv)
        self.processes.append(process)
        return process, Diagnostics(http_port, process)

    def producer(self, producer_id: str, *flags: str) -> Process:
        argv = [sys.executable, "-m", "producer", "run", "--connect", self.endpoint, "--producer-id", producer_id,
                "--status-every", "0.5", *TINY_DATA, *flags]
        process = Process(f"producer {producer_id}", argv)
        self.processes.append(process)
        return process

    def outputs(self) -> str:
        return "\n".join(process.output() for process in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.kill_if_alive()


class Diagnostics:
    """``GET /diagnostics`` of one trainer process."""

    def __init__(self, http_port: int, trainer: Process) -> None:
        self.url = f"http://127.0.0.1:{http_port}/diagnostics"
        self.trainer = trainer

    def get(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_for(self, condition, what: str, timeout: float = START_TIMEOUT_S) -> dict:
        """Polls until ``condition(snapshot)`` holds; returns that snapshot."""
        deadline = time.monotonic() + timeout
        snapshot = None
        while time.monotonic() < deadline:
            assert self.trainer.alive(), f"the trainer ended while waiting for {what}\n{self.trainer.output()}"
            snapshot = self.get()
            if snapshot is not None and condition(snapshot):
                return snapshot
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last stream {snapshot and snapshot['stream']}\n{self.trainer.output()}")

    def wait_for_step(self, step: int, timeout: float = START_TIMEOUT_S) -> dict:
        return self.wait_for(lambda s: s["step"] >= step, f"step {step}", timeout)


def last_status_count(producer: Process) -> int:
    """Messages sent according to the producer's latest status line on stderr."""
    line = [line for line in producer.lines if line.endswith(" messages sent")][-1]
    return int(line.rsplit(" messages sent", 1)[0].rsplit(" ", 1)[1])
