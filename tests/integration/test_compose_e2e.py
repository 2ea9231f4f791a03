"""``scripts/compose-e2e.sh``: the stack in real containers (build, scale, resume, a producers-only
host, Prometheus, CurveZMQ). Runs when a Docker engine with Compose v2 answers and the base image
is there (``bash ../shared/tools/container-engine.sh`` sets both up); skips with the reason otherwise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow
BASE_IMAGE = os.environ.get("BASE_IMAGE", "local/python:3.11-slim")
PHASES = ["build", "up", "scale", "restart", "resume", "remote", "prom", "curve"]


def docker_missing() -> str | None:
    """Why the e2e cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker client"
    for command, what in ((["docker", "info"], "no Docker engine answers"), (["docker", "compose", "version"], "no Compose v2"),
                          (["docker", "image", "inspect", BASE_IMAGE], f"no {BASE_IMAGE} image")):
        try:
            if subprocess.run(command, capture_output=True, timeout=20).returncode != 0:
                return f"{what} ({' '.join(command)} failed; bash ../shared/tools/container-engine.sh sets one up)"
        except subprocess.TimeoutExpired:
            return f"{what} ({' '.join(command)} timed out)"
    return None


def test_compose_end_to_end():
    missing = docker_missing()
    if missing is not None:
        pytest.skip(missing)
    project = f"linepack-e2e-{os.getpid()}"
    done = subprocess.run(["bash", "scripts/compose-e2e.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BASE_IMAGE": BASE_IMAGE, "PROJECT": project})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    timed = re.findall(r"phase (\w+) took (\d+) s", output)
    assert [phase for phase, _ in timed] == PHASES, output[-3000:]
    assert "Prometheus: linepack_step ->" in output or "skipped the Prometheus server" in output
    assert re.search(r"passed in \d+ s", output) and "cleaned up (exit 0)" in output
    assert "ok: prepared corpus at /data/prepared, mode 755" in output  # what the containers' uid 1000 read
    image = f"linepack-e2e:{project}"  # what it built, and only that, is gone: no 1.5 GB image left per test run
    assert f"removed the image {image}" in output
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60).returncode != 0
