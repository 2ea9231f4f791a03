#!/usr/bin/env bash
# The main job: install what is missing, then run the local stack (a trainer and two producers
# on this machine, diagnostics on http://127.0.0.1:8000/). Arguments go to `python -m trainer.stack`:
#   bash scripts/run.sh --producers 4 --max-iters 5000 --corpus my.txt
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m trainer.stack "$@"
