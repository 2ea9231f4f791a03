#!/usr/bin/env bash
# Installs Linepack and its test tools into the current Python.
# torch comes first as a CPU build when it is missing (pip's configured index or find-links),
# so the range in pyproject.toml never pulls a multi-GB CUDA build on a machine without a GPU.
# pip is skipped when this checkout is installed already, at its version, with every requirement
# (scripts/installed.py), so a second run.sh or test.sh starts at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
if "$PYTHON" scripts/installed.py test "${EXTRAS:-}"; then
    echo "[setup] linepack is installed from this checkout with every requirement: pip skipped"
else
    "$PYTHON" -m pip install --quiet -e ".[test${EXTRAS:+,$EXTRAS}]"
fi
