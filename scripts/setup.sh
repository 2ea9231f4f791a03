#!/usr/bin/env bash
# Installs Linepack and its test tools into the current Python.
# torch comes first as a CPU build when it is missing, so the range in pyproject.toml
# never pulls a multi-GB CUDA build on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0" \
        || "$PYTHON" -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install --quiet -e ".[test${EXTRAS:+,$EXTRAS}]"
