"""The local stack: one trainer and N producers as plain processes on this machine.

    python -m trainer.stack [--producers 2] [--corpus PATH] [--max-iters 2000]
                            [--port 5555] [--bind-host 127.0.0.1]
                            [--http-host 127.0.0.1] [--http-port 8000] [--out-dir runs/stack]
                            [--producer-args "ARGS"] [--trainer-args "ARGS"]

``--producer-args`` / ``--trainer-args`` are shell-quoted strings appended to every producer's
(the trainer's) command line after the launcher's own flags, so they override them (argparse
keeps the last value): ``--producer-args "--block-size 256 --policy uniform"``. A single flag
with no value needs the ``=`` form: ``--producer-args=--supervise-sep``.

Every child's output is relayed here line by line with a ``[name]`` prefix
(:mod:`trainer.processes`), and a child that exits is reported, never restarted. Ctrl-C or
SIGTERM stops the stack (:func:`trainer.processes.stop_all`). The stack ends when the trainer
ends, with the trainer's exit code (128 + the signal's number after a signal). Producers and
trainer run with their own defaults (``--corpus`` and ``--max-iters`` are theirs, passed on).

Producers are started as processes (``python -m producer run``); this module never imports them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
import threading
from dataclasses import dataclass

from shared import settings
from shared.data_config import DataConfig
from shared.settings import setting
from trainer.loop.config import TrainConfig
from trainer.processes import Child, exit_description, python_module, say, stop_all

POLL_INTERVAL_S = 0.5


@dataclass(frozen=True)
class StackSettings:
    """The launcher's own flags; the data and training flags are the producers' and the trainer's."""

    producers: int = setting(2, "producer processes to start", metavar="N")
    port: int = setting(5555, "the trainer's ZeroMQ port", metavar="PORT")
    bind_host: str = setting("127.0.0.1", "address the trainer's ZeroMQ socket binds; 0.0.0.0 or * also accepts "
                                          "producers from other hosts", metavar="HOST")
    http_host: str = setting("127.0.0.1", "diagnostics address", metavar="HOST")
    http_port: int = setting(8000, "diagnostics port", metavar="PORT")
    out_dir: str = setting(os.path.join("runs", "stack"), "the trainer's run directory", metavar="DIR")
    producer_args: tuple[str, ...] = setting((), "extra producer flags as one quoted string; repeatable", metavar="ARGS",
                                             many=True, separator=None)
    trainer_args: tuple[str, ...] = setting((), "extra trainer flags as one quoted string; repeatable", metavar="ARGS",
                                            many=True, separator=None)


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
    settings.add_arguments(parser, StackSettings)
    settings.add_arguments(parser, DataConfig, only=("corpus",))
    settings.add_arguments(parser, TrainConfig, only=("max_iters",))
    return parser


def producer_command(args: argparse.Namespace, producer_id: str) -> list[str]:
    """The command line of one producer; only ``producer_id`` differs between producers."""
    command = python_module("producer", "run", "--connect", f"tcp://127.0.0.1:{args.port}", "--producer-id", producer_id)
    command += settings.to_argv(settings.from_namespace(DataConfig, args), only=("corpus",))
    for extra in args.producer_args:
        command += shlex.split(extra)
    return command


def trainer_threads(producers: int) -> int:
    """torch threads for a trainer sharing this machine with ``producers`` producer processes:
    the cores they leave, at least one (more threads than free cores make CPU steps many times slower)."""
    return max(1, (os.cpu_count() or 1) - producers)


def trainer_command(args: argparse.Namespace) -> list[str]:
    bind_host = "*" if args.bind_host in ("*", "0.0.0.0") else args.bind_host
    command = python_module("trainer", "--bind", f"tcp://{bind_host}:{args.port}", "--http-host", args.http_host,
                            "--http-port", str(args.http_port), "--out-dir", args.out_dir, "--max-iters", str(args.max_iters),
                            "--threads", str(trainer_threads(args.producers)))
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
            if trainer.poll() is not None:
                break
            report_exited_producers(children[1:])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if stop_signal:
            say("stack", f"{signal.Signals(stop_signal[0]).name}: stopping {len(children)} process(es)")
        stop_all(children)

    if stop_signal:
        return 128 + stop_signal[0]
    code = trainer.process.returncode
    say("stack", f"trainer {exit_description(code)}; stack stopped")
    return code if code >= 0 else 128 - code


def report_exited_producers(producers: list[Child]) -> None:
    """Say once, loudly, when a producer has exited: nothing restarts it."""
    for producer in producers:
        code = producer.poll()
        if code is None or producer.reported:
            continue
        producer.reported = True
        alive = sum(other.poll() is None for other in producers)
        say("stack", f"{producer.name} (pid {producer.pid}) {exit_description(code)}; not restarted; "
                     f"{alive} producer(s) left" + ("" if alive else ": the trainer waits for data"))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
