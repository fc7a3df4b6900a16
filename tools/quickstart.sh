#!/usr/bin/env bash
# Main job (README): environment if missing, then the whole pipeline on synthetic data (tools/quickstart.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PYTHONUNBUFFERED=1
exec .venv/bin/python tools/quickstart.py "$@"
