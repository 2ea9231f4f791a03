#!/usr/bin/env bash
# The README's test command: install what is missing, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m ruff check .
exec "${PYTHON:-python3}" -m pytest -q "$@"
