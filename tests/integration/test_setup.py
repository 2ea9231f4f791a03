"""``scripts/setup.sh`` (run by run.sh and test.sh): pip only when this checkout is not installed
and current (``scripts/installed.py``). pip itself is never run here: a stand-in python writes
down what it was asked, and a stand-in ``linepack`` distribution on PYTHONPATH is what is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

STAND_IN_PYTHON = """#!/usr/bin/env bash
# python, except that `-m pip ...` is only written down
if [[ $1 == -m && $2 == pip ]]; then echo "$*" >> "$PIP_LOG"; exit 0; fi
exec {python} "$@"
"""


def stand_in(site, name, version):
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return info


def run_setup(tmp_path, version="0.1.0", url=None, editable=True, old_tqdm=False):
    """Runs setup.sh with a stand-in linepack ``version`` installed from ``url`` (None: this
    checkout) and, with ``old_tqdm``, a tqdm too old for it; pip's argv (or None) and the output."""
    info = stand_in(tmp_path / "site", "linepack", version)
    (info / "direct_url.json").write_text(json.dumps({"url": url or ROOT.as_uri(), "dir_info": {"editable": editable}}))
    if old_tqdm:
        stand_in(tmp_path / "site", "tqdm", "4.0.0")
    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    log = tmp_path / "pip.log"
    environment = {**os.environ, "PYTHON": str(python), "PYTHONPATH": str(tmp_path / "site"), "PIP_LOG": str(log)}
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return (log.read_text().strip() if log.exists() else None), done.stdout + done.stderr


def test_a_current_install_skips_pip(tmp_path):
    pip, output = run_setup(tmp_path)
    assert pip is None and "pip skipped" in output


@pytest.mark.parametrize(("installed", "reason"), [
    ({"version": "0.0.9"}, "linepack 0.0.9 is installed, pyproject.toml says 0.1.0"),
    ({"url": "file:///elsewhere"}, "installed from file:///elsewhere, not as an editable install of"),
    ({"editable": False}, "not as an editable install of"),
    ({"old_tqdm": True}, "tqdm 4.0.0 does not satisfy tqdm>=4.60"),
])
def test_an_install_that_is_not_current_runs_pip(tmp_path, installed, reason):
    pip, output = run_setup(tmp_path, **installed)
    assert pip == "-m pip install --quiet -e .[test]" and reason in output
