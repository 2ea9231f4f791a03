"""One trainer per run folder: ``--out-dir`` is locked while a trainer uses it.

Two trainers on one folder would interleave ``metrics.jsonl`` into invalid JSON and overwrite
each other's ``ckpt.pt``. The first takes an exclusive ``flock`` on ``DIR/trainer.lock`` (held
until the process ends, released by the kernel even on SIGKILL) and writes who it is into it;
a second is refused, naming the holder, as a second writer of a recording is
(``shared/recording.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import IO

LOCK_NAME = "trainer.lock"
MAX_HOLDER_BYTES = 4096  # what is read back of a holder's line
_HELD: list[IO[str]] = []  # the open lock files: a lock lasts as long as its file is open


class RunFolderInUse(OSError):
    """Another live process holds the run folder's lock."""


def lock_run_folder(out_dir: str) -> None:
    """Makes ``out_dir`` and locks it for the rest of this process's life. Raises
    RunFolderInUse naming the holder (pid, host, start time), OSError when the folder cannot be
    made."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open while the trainer runs
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.seek(0)
        holder = file.read(MAX_HOLDER_BYTES).strip() or "unknown"
        file.close()
        raise RunFolderInUse(f"{out_dir} is in use by another trainer ({holder}): give each run its own --out-dir, "
                             "or stop that trainer first (--resume continues its run)") from None
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started} "
               + json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
    file.flush()
    _HELD.append(file)
