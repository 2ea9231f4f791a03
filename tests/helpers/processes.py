"""Real ``python -m trainer`` / ``python -m producer`` children on 127.0.0.1 for the integration tests.

``Process`` wraps one child: its merged output is collected line by line in a thread, so a
test can wait for a log line, read a producer's ``summary {json}`` or the trainer's
``done: {json}`` line (:func:`final_json`, the one parser of those lines) and read its RSS.
``Children`` starts them and kills whatever still runs at teardown; ``Cluster`` adds one
ZeroMQ port with a tiny trainer and producers on it. ``Diagnostics`` polls a trainer's
``GET /diagnostics``. Every wait is bounded. ``free_port``/``free_ports`` pick ports,
``run_module`` runs ``python -m ...`` to completion.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from shared.endpoints import free_port

from helpers import ROOT

# Short rows and a one-layer model: a CPU step takes milliseconds, a checkpoint every 10 steps.
TINY_DATA = ["--block-size", "32", "--rows-per-message", "8"]
TINY_MODEL = ["--batch-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--eval-interval", "10",
              "--eval-batches", "2", "--log-interval", "5", "--warmup-iters", "5", "--device", "cpu",
              "--probe-interval", "0"]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SUMMARY = "summary "  # a producer's last line: ``summary {json}``
DONE = "done: "  # the trainer's last log line: ``... done: {json}``


def free_ports(count: int) -> list[int]:
    """``count`` consecutive free ports below Linux's ephemeral range (32768-60999), so that no
    process binding port 0 meanwhile (torchrun's store, an HTTP server) can take one of them:
    the trainer's ranks bind base port + local rank, which must be free as a block."""
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20000, 32768 - count)
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(sockets):
                probe.bind(("127.0.0.1", base + offset))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def final_json(output: str | Iterable[str], prefix: str = SUMMARY) -> dict | None:
    """The JSON after ``prefix`` on the last line that holds it (:data:`SUMMARY`, :data:`DONE`);
    None when no line does. ``output`` is a process's text or its lines."""
    lines = output.splitlines() if isinstance(output, str) else output
    found = [line.split(prefix, 1)[1] for line in lines if prefix in line]
    return json.loads(found[-1]) if found else None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"pid {pid} has no VmRSS")


def module_argv(*args) -> list[str]:
    """``python -m ARGS`` with this interpreter."""
    return [sys.executable, "-m", *map(str, args)]


def run_module(*args, timeout: float = 60, **options) -> subprocess.CompletedProcess:
    """Runs ``python -m ARGS`` in the repository to completion, its output captured as text."""
    return subprocess.run(module_argv(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, **options)


class Process:
    """A child process whose stdout and stderr are collected into :attr:`lines`.

    ``stdout``: a file path that gets the child's stdout instead; :attr:`lines` then holds its
    stderr only. ``new_session``: the child leads a session of its own (:meth:`kill` then kills
    everything in it, e.g. torchrun's workers).
    """

    def __init__(self, name: str, argv: list[str], *, stdout: Path | None = None, new_session: bool = False) -> None:
        self.name = name
        self.new_session = new_session
        # Several processes share a few test cores; lines arrive as they are written.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        out = open(stdout, "w") if stdout is not None else None  # the child keeps its own copy
        try:
            self.popen = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out or subprocess.PIPE,
                                          stderr=subprocess.PIPE if out else subprocess.STDOUT, text=True,
                                          errors="replace", env=env, start_new_session=new_session)
        finally:
            if out is not None:
                out.close()
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, args=(self.popen.stderr if out else self.popen.stdout,),
                                        daemon=True)
        self._reader.start()

    def _collect(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

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
        """Sends ``sig``; returns the exit status (see :meth:`wait`)."""
        self.popen.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the child (to its whole session with ``new_session``); does not wait."""
        if self.new_session:
            os.killpg(self.pid, signal.SIGKILL)
        else:
            self.popen.kill()

    def kill_if_alive(self) -> None:
        if self.alive():
            self.kill()
        self.popen.wait(10)

    def json_line(self, prefix: str = SUMMARY) -> dict | None:
        """:func:`final_json` of this process's output (``"summary "``, ``"done: "``)."""
        return final_json(self.lines, prefix)

    def summary(self) -> dict:
        """A producer's final ``summary {json}``; AssertionError (with the output) when it wrote none."""
        summary = self.json_line(SUMMARY)
        assert summary is not None, f"no summary line\n{self.output()}"
        return summary

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


class Children:
    """Processes started by one test; whatever still runs at teardown (:meth:`close`) is killed."""

    def __init__(self) -> None:
        self.processes: list[Process] = []

    def add(self, process: Process) -> Process:
        self.processes.append(process)
        return process

    def start(self, *args, name: str | None = None, **options) -> Process:
        """``python -m ARGS`` as a :class:`Process` named ``name`` (the module by default); ``options`` go to it."""
        return self.add(Process(name or str(args[0]), module_argv(*args), **options))

    def outputs(self) -> str:
        return "\n".join(process.output() for process in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.kill_if_alive()


class Cluster(Children):
    """Starts tiny trainers and producers on one ZeroMQ port."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.tmp_path = tmp_path
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    def trainer(self, out_dir: Path, *flags: str, http_port: int | None = None) -> tuple[Process, Diagnostics]:
        http_port = http_port or free_port()
        process = self.start("trainer", "--bind", self.endpoint, "--out-dir", out_dir, "--http-port", http_port,
                             "--max-iters", "100000", *TINY_MODEL, *flags, name="trainer")
        return process, Diagnostics(http_port, process)

    def producer(self, producer_id: str, *flags: str) -> Process:
        return self.start("producer", "run", "--connect", self.endpoint, "--producer-id", producer_id,
                          "--status-every", "0.5", *TINY_DATA, *flags, name=f"producer {producer_id}")


class Diagnostics:
    """``GET /diagnostics`` of one trainer, or of a launcher that serves its trainer's."""

    def __init__(self, http_port: int, trainer: Process, poll_s: float = 0.1) -> None:
        self.url = f"http://127.0.0.1:{http_port}/diagnostics"
        self.trainer = trainer
        self.poll_s = poll_s

    def get(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                return json.load(response)
        except OSError:  # not listening yet, refused, reset, timed out, an HTTP error status
            return None

    def wait_for(self, condition, what: str, timeout: float = START_TIMEOUT_S) -> dict:
        """Polls until ``condition(snapshot)`` holds; returns that snapshot."""
        deadline = time.monotonic() + timeout
        snapshot = None
        while time.monotonic() < deadline:
            assert self.trainer.alive(), f"{self.trainer.name} ended while waiting for {what}\n{self.trainer.output()}"
            snapshot = self.get()
            if snapshot is not None and condition(snapshot):
                return snapshot
            time.sleep(self.poll_s)
        raise AssertionError(f"timed out waiting for {what}; last stream {snapshot and snapshot['stream']}\n{self.trainer.output()}")

    def wait_for_step(self, step: int, timeout: float = START_TIMEOUT_S) -> dict:
        return self.wait_for(lambda s: s["step"] >= step, f"step {step}", timeout)


def last_status_count(producer: Process) -> int:
    """Messages handed to ZeroMQ according to the producer's latest status line on stderr."""
    line = [line for line in producer.lines if " messages handed to ZeroMQ" in line][-1]
    return int(line.split(" messages handed to ZeroMQ", 1)[0].rsplit(" ", 1)[1])
