#!/usr/bin/env bash
# Build the project's virtual environment at .venv/ (idempotent).
# torch first (its wheel lies on the local disk), then packages whose setup.py imports torch
# (sam2, deepspeed) without build isolation, then xtuner with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.requirements.sha
want=$(cat requirements.txt tools/setup_env.sh setup.py | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
echo "[setup_env] building $VENV with $($PY --version)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade "pip<26" "setuptools<81" wheel
$PIP install torch==2.14.1 torchvision==0.29.1
DS_BUILD_OPS=0 $PIP install -r requirements.txt --no-build-isolation -c <(grep -E '^(torch|torchvision)==' requirements.txt)
SAM2_BUILD_CUDA=0 $PIP install --no-build-isolation --no-deps sam2==1.1.0
$PIP install --no-deps xtuner==0.2.0
$PIP install --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "[setup_env] done: $VENV/bin/python"
