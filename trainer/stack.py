"""The local stack: one trainer and N producers as plain processes on this machine.

    python -m trainer.stack [--producers 2] [--corpus PATH] [--max-iters 2000]
                            [--port 5555] [--bind-host 127.0.0.1]
                            [--http-host 127.0.0.1] [--http-port 8000] [--out-dir runs/stack]
                            [--producer-args "ARGS"] [--trainer-args "ARGS"]

``--producer-args`` / ``--trainer-args`` are shell-quoted strings appended to every producer's
(the trainer's) command line after the launcher's own defaults, so they override them
(argparse keeps the last value): ``--producer-args "--block-size 256 --policy uniform"``. A single
flag with no value needs the ``=`` form: ``--producer-args=--supervise-sep``.

Every child runs in its own session (its own process group), its output is relayed here line by
line with a ``[name]`` prefix, and a child that exits is reported, never restarted. Ctrl-C or
SIGTERM stops the stack: SIGTERM to every child's group (both CLIs then close their sockets and
flush what they write), then SIGKILL to whatever is left after :data:`STOP_TIMEOUT_S`. The stack
ends when the trainer ends, with the trainer's exit code (128 + the signal's number after a signal).

Producers are started as processes (``python -m producer run``); this module never imports them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

# A small model and short rows: a few minutes of training on a laptop CPU.
DEFAULT_PRODUCER_ARGS = ("--block-size", "128", "--rows-per-message", "16")
DEFAULT_TRAINER_ARGS = ("--batch-size", "32", "--n-layer", "4", "--n-head", "4", "--n-embd", "128")
STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.5

_print_lock = threading.Lock()


def say(name: str, line: str) -> None:
    """Print one line with a ``[name]`` prefix; lines of different children never interleave."""
    with _print_lock:
        print(f"[{name}] {line}", flush=True)


class Child:
    """A started process, its name for the log, and the thread that relays its output."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", env=env, start_new_session=True)
        self.reported = False
        self._relay = threading.Thread(target=self._relay_output, name=f"relay-{name}", daemon=True)
        self._relay.start()

    def _relay_output(self) -> None:
        for line in self.process.stdout:
            say(self.name, line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group (its own children included)."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def finish_relay(self, timeout: float = 1.0) -> None:
        self._relay.join(timeout)


def exit_description(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def stop_children(children: list[Child], timeout: float = STOP_TIMEOUT_S) -> None:
    """Terminate every child's process group, wait up to ``timeout`` seconds, then kill the rest.

    Groups are signalled even when the leader has exited, so a grandchild left behind dies too.
    """
    for child in children:
        child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say("stack", f"{child.name} (pid {child.pid}) did not stop within {timeout:.0f} s: killing it")
    for child in children:
        child.signal_group(signal.SIGKILL)
        child.process.wait()
        child.finish_relay()


def check_port_free(host: str, port: int, what: str) -> None:
    """Exit with a clear message when something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SystemExit(f"[stack] cannot use {host}:{port} for the {what}: {error.strerror}; "
                             f"pick another port") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.stack",
        description="Run a trainer and N producers as local processes; Ctrl-C stops them all.")
    parser.add_argument("--producers", type=int, default=2, help="producer processes to start (default: 2)")
    parser.add_argument("--corpus", metavar="PATH", default=None,
                        help="text file or folder for the producers (default: the built-in corpus)")
    parser.add_argument("--max-iters", type=int, default=2000, help="training steps (default: 2000)")
    parser.add_argument("--port", type=int, default=5555, help="the trainer's ZeroMQ port (default: 5555)")
    parser.add_argument("--bind-host", default="127.0.0.1",
                        help="address the trainer's ZeroMQ socket binds; 0.0.0.0 or * also accepts "
                             "producers from other hosts (default: 127.0.0.1)")
    parser.add_argument("--http-host", default="127.0.0.1", help="diagnostics address (default: 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000, help="diagnostics port (default: 8000)")
    parser.add_argument("--out-dir", default=os.path.join("runs", "stack"),
                        help="the trainer's run directory (default: runs/stack)")
    parser.add_argument("--producer-args", action="append", default=[], metavar="ARGS",
                        help="extra producer flags as one quoted string; repeatable")
    parser.add_argument("--trainer-args", action="append", default=[], metavar="ARGS",
                        help="extra trainer flags as one quoted string; repeatable")
    return parser


def producer_command(args: argparse.Namespace, producer_id: str) -> list[str]:
    """The command line of one producer; only ``producer_id`` differs between producers."""
    command = [sys.executable, "-m", "producer", "run", "--connect", f"tcp://127.0.0.1:{args.port}",
               "--producer-id", producer_id, *DEFAULT_PRODUCER_ARGS]
    if args.corpus is not None:
        command += ["--corpus", args.corpus]
    for extra in args.producer_args:
        command += shlex.split(extra)
    return command


def trainer_threads(producers: int) -> int:
    """torch threads for a trainer sharing this machine with ``producers`` producer processes:
    the cores they leave, at least one (more threads than free cores make CPU steps many times slower)."""
    return max(1, (os.cpu_count() or 1) - producers)


def trainer_command(args: argparse.Namespace) -> list[str]:
    bind_host = "*" if args.bind_host in ("*", "0.0.0.0") else args.bind_host
    command = [sys.executable, "-m", "trainer", "--bind", f"tcp://{bind_host}:{args.port}",
               "--http-host", args.http_host, "--http-port", str(args.http_port),
               "--out-dir", args.out_dir, "--max-iters", str(args.max_iters), *DEFAULT_TRAINER_ARGS,
               "--threads", str(trainer_threads(args.producers))]
    for extra in args.trainer_args:
        command += shlex.split(extra)
    return command


def run(args: argparse.Namespace) -> int:
    """Start the stack, relay its output until the trainer ends or a signal comes; return the exit code."""
    if args.producers < 0:
        raise SystemExit("[stack] --producers must be 0 or more")
    check_port_free("127.0.0.1" if args.bind_host in ("*", "0.0.0.0") else args.bind_host, args.port,
                    "trainer's ZeroMQ socket")
    check_port_free(args.http_host, args.http_port, "diagnostics server")

    stop_signal: list[int] = []
    stop_requested = threading.Event()

    def request_stop(signum, _frame):
        stop_signal.append(signum)
        stop_requested.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    try:
        trainer = Child("trainer", trainer_command(args))
        children.append(trainer)
        say("stack", f"trainer pid {trainer.pid}: {shlex.join(trainer.argv)}")
        for index in range(args.producers):
            producer = Child(f"producer-{index}", producer_command(args, str(index)))
            children.append(producer)
            say("stack", f"{producer.name} pid {producer.pid}: {shlex.join(producer.argv)}")
        url = f"http://{args.http_host}:{args.http_port}"
        say("stack", f"diagnostics: curl {url}/diagnostics   live page: {url}/   metrics: {url}/metrics")
        say("stack", f"add a producer from another shell: {shlex.join(producer_command(args, str(args.producers)))}")
        say("stack", "Ctrl-C stops everything")

        while not stop_requested.wait(POLL_INTERVAL_S):
            if trainer.process.poll() is not None:
                break
            report_exited_producers(children[1:])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if stop_signal:
            say("stack", f"{signal.Signals(stop_signal[0]).name}: stopping {len(children)} process(es)")
        stop_children(children)

    if stop_signal:
        return 128 + stop_signal[0]
    code = trainer.process.returncode
    say("stack", f"trainer {exit_description(code)}; stack stopped")
    return code if code >= 0 else 128 - code


def report_exited_producers(producers: list[Child]) -> None:
    """Say once, loudly, when a producer has exited: nothing restarts it."""
    for producer in producers:
        code = producer.process.poll()
        if code is None or producer.reported:
            continue
        producer.reported = True
        alive = sum(other.process.poll() is None for other in producers)
        say("stack", f"{producer.name} (pid {producer.pid}) {exit_description(code)}; not restarted; "
                     f"{alive} producer(s) left" + ("" if alive else ": the trainer waits for data"))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
