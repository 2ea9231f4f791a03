"""What the tests share; importable from every test folder (``pythonpath = ["tests"]`` in pyproject.toml).

- :mod:`helpers.wire`: hand-built valid metas, tensors and frames, the independent message
  checker, byte-level mutations;
- :mod:`helpers.streams`: synthetic torch batch streams and in-process fakes for the trainer;
- :mod:`helpers.processes`: real ``python -m producer`` / ``python -m trainer`` children, free
  ports, their final ``summary {json}`` / ``done: {json}`` lines.
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/helpers/__init__.py
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"  # shipped with the repository (data/README.md)


def wait_until(predicate, timeout: float = 10.0) -> None:
    """Polls ``predicate`` every 10 ms; AssertionError when it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
