"""The local stack: one trainer and N producers as plain processes on this machine.

    python -m trainer.stack [--producers 2] [--corpus [NAME=]PATH[:WEIGHT] ... | --mixture FILE] [--max-iters 2000]
                            [--port 5555] [--bind-host 127.0.0.1]
                            [--http-host 127.0.0.1] [--http-port 8000] [--out-dir runs/stack]
                            [--producer-args "ARGS"] [--trainer-args "ARGS"]

``--producer-args`` / ``--trainer-args`` are shell-quoted strings appended to every producer's
(the trainer's) command line after the launcher's own flags, so they override them (argparse
keeps the last value): ``--producer-args "--block-size 256 --policy uniform"``,
``--trainer-args "--resume"`` (a lone flag works as well as the ``=`` form).

A run never overwrites another: without ``--out-dir`` the run directory is ``runs/stack``, or,
when that holds an earlier run (a checkpoint or metrics), ``runs/stack-N`` with the next N
(with ``--resume`` in ``--trainer-args``: the latest of them, to continue it); the launcher says
which. A ``--out-dir`` that holds a run is continued with ``--resume`` and refused without it
(the trainer exits 2, nothing written).

Every child's output is relayed here line by line with a ``[name]`` prefix
(:mod:`trainer.runtime.processes`), and a child that exits is reported, never restarted. Ctrl-C or
SIGTERM stops the stack (:func:`trainer.runtime.processes.stop_all`). The stack ends when the trainer
ends, with the trainer's exit code (128 + the signal's number after a signal). Producers and
trainer run with their own defaults (``--corpus`` / ``--mixture`` and ``--max-iters`` are theirs, passed on).

Producers are started as processes (``python -m producer run``); this module never imports them.
"""

from __future__ import annotations

import argparse
import os
import re
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
from trainer.loop.startup import earlier_run
from trainer.runtime.processes import Child, exit_description, python_module, say, stop_all

POLL_INTERVAL_S = 0.5
DEFAULT_OUT_DIR = os.path.join("runs", "stack")
PASS_THROUGH_FLAGS = ("--producer-args", "--trainer-args")


@dataclass(frozen=True)
class StackSettings:
    """The launcher's own flags; the data and training flags are the producers' and the trainer's."""

    producers: int = setting(2, "producer processes to start", metavar="N")
    port: int = setting(5555, "the trainer's ZeroMQ port", metavar="PORT")
    bind_host: str = setting("127.0.0.1", "address the trainer's ZeroMQ socket binds; 0.0.0.0 or * also accepts "
                                          "producers from other hosts", metavar="HOST")
    http_host: str = setting("127.0.0.1", "diagnostics address", metavar="HOST")
    http_port: int = setting(8000, "diagnostics port", metavar="PORT")
    out_dir: str | None = setting(None, f"the trainer's run directory; default {DEFAULT_OUT_DIR}, or {DEFAULT_OUT_DIR}-N "
                                        "with the next N when that holds an earlier run (with --resume in --trainer-args: "
                                        "the latest); one named here that holds a run needs --resume", metavar="DIR")
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
    settings.add_arguments(parser, DataConfig, only=("corpus", "mixture"))
    settings.add_arguments(parser, TrainConfig, only=("max_iters",))
    return parser


def join_pass_through(argv: list[str]) -> list[str]:
    """``argv`` with ``--trainer-args VALUE`` (and ``--producer-args VALUE``) written as
    ``--trainer-args=VALUE``: argparse takes a lone value that starts with ``-``
    (``--trainer-args --resume``) for an option of its own and rejects the flag."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] in PASS_THROUGH_FLAGS and index + 1 < len(argv):
            joined.append(f"{argv[index]}={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    return joined


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's arguments (``sys.argv[1:]`` by default); a usage error exits 2."""
    return build_parser().parse_args(join_pass_through(sys.argv[1:] if argv is None else argv))


def asks_to_resume(args: argparse.Namespace) -> bool:
    """Whether the trainer will resume: ``--resume`` (any mode but never) in ``--trainer-args``,
    or ``LINEPACK_RESUME``, read with the trainer's own declaration of the flag."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    settings.add_arguments(parser, TrainConfig, only=("resume",))
    known, _ = parser.parse_known_args([arg for extra in args.trainer_args for arg in shlex.split(extra)])
    return known.resume != "never"


def run_directory(args: argparse.Namespace) -> tuple[str, str]:
    """The trainer's run directory and a line that says why it is that one.

    ``--out-dir`` when given. Otherwise :data:`DEFAULT_OUT_DIR` when neither it nor any
    ``DEFAULT_OUT_DIR-N`` holds an earlier run; when some do, the next N for a new run, or the
    latest (highest N) when the trainer resumes."""
    if args.out_dir is not None:
        return args.out_dir, f"run directory {args.out_dir}"
    parent, name = os.path.split(DEFAULT_OUT_DIR)
    pattern = re.compile(rf"{re.escape(name)}(?:-(\d+))?")
    held = {}
    for entry in os.listdir(parent) if os.path.isdir(parent) else ():
        match = pattern.fullmatch(entry)
        if match and earlier_run(os.path.join(parent, entry)) is not None:
            held[int(match.group(1) or 1)] = os.path.join(parent, entry)
    if not held:
        return DEFAULT_OUT_DIR, f"run directory {DEFAULT_OUT_DIR}"
    latest = max(held)
    if asks_to_resume(args):
        return held[latest], f"run directory {held[latest]}: resuming the latest run there"
    new = f"{DEFAULT_OUT_DIR}-{latest + 1}"
    return new, (f"run directory {new}: {held[latest]} holds an earlier run, left as it is "
                 f"(--out-dir DIR picks one; --trainer-args --resume continues the latest)")


def producer_command(args: argparse.Namespace, producer_id: str) -> list[str]:
    """The command line of one producer; only ``producer_id`` differs between producers."""
    command = python_module("producer", "run", "--connect", f"tcp://127.0.0.1:{args.port}", "--producer-id", producer_id)
    command += settings.to_argv(settings.from_namespace(DataConfig, args), only=("corpus", "mixture"))
    for extra in args.producer_args:
        command += shlex.split(extra)
    return command


def trainer_threads(producers: int) -> int:
    """torch threads for a trainer sharing this machine with ``producers`` producer processes:
    the cores they leave, at least one (more threads than free cores make CPU steps many times slower)."""
    return max(1, (os.cpu_count() or 1) - producers)


def trainer_command(args: argparse.Namespace, out_dir: str) -> list[str]:
    """The trainer's command line, training into ``out_dir`` (:func:`run_directory`)."""
    bind_host = "*" if args.bind_host in ("*", "0.0.0.0") else args.bind_host
    command = python_module("trainer", "--bind", f"tcp://{bind_host}:{args.port}", "--http-host", args.http_host,
                            "--http-port", str(args.http_port), "--out-dir", out_dir, "--max-iters", str(args.max_iters),
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
    out_dir, why = run_directory(args)

    stop_signal: list[int] = []
    stop_requested = threading.Event()

    def request_stop(signum, _frame):
        stop_signal.append(signum)
        stop_requested.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    children: list[Child] = []
    try:
        say("stack", why)
        trainer = Child("trainer", trainer_command(args, out_dir))
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
        say("stack", f"stopped; the run is in {out_dir}")
        return 128 + stop_signal[0]
    code = trainer.process.returncode
    say("stack", f"trainer {exit_description(code)}; stack stopped; the run is in {out_dir}")
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
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
