"""Child processes for the launchers (``trainer.stack``, ``trainer.compare``): started, relayed, stopped.

Every child runs in its own session (its own process group), so stopping it reaches its own
children too. Its merged stdout and stderr either go to a log file or are relayed line by line
to this process's stdout with a ``[name]`` prefix. :func:`stop_all` sends SIGTERM to every
child's group (both CLIs then close their sockets and flush what they write), waits, then
sends SIGKILL to whatever is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

STOP_TIMEOUT_S = 5.0

_print_lock = threading.Lock()


def say(name: str, line: str) -> None:
    """Print one line with a ``[name]`` prefix; lines of different children never interleave."""
    with _print_lock:
        print(f"[{name}] {line}", flush=True)


def python_module(module: str, *args: str) -> list[str]:
    """The command line of ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class Child:
    """A started process and its name for the log.

    Args:
        name: shown in relayed lines and messages.
        argv: the command line.
        log_path: where its output goes; None relays it to stdout with a ``[name]`` prefix.
    """

    def __init__(self, name: str, argv: list[str], log_path: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.reported = False
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._relay: threading.Thread | None = None
        if log_path is None:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, errors="replace", env=env, start_new_session=True)
            self._relay = threading.Thread(target=self._relay_output, name=f"relay-{name}", daemon=True)
            self._relay.start()
        else:
            with open(log_path, "w", encoding="utf-8") as log_file:
                self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                                env=env, start_new_session=True)

    def _relay_output(self) -> None:
        for line in self.process.stdout:
            say(self.name, line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group (its own children included)."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def finish_relay(self, timeout: float = 1.0) -> None:
        if self._relay is not None:
            self._relay.join(timeout)


def exit_description(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def stop_all(children: list[Child], timeout: float = STOP_TIMEOUT_S, quiet: bool = False) -> None:
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
            if not quiet:
                say("stack", f"{child.name} (pid {child.pid}) did not stop within {timeout:.0f} s: killing it")
    for child in children:
        child.signal_group(signal.SIGKILL)
        child.process.wait()
        child.finish_relay()
