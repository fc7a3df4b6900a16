#!/usr/bin/env bash
# Fill ./.whl with the Python 3.12 wheels that tools/device_bench.sh installs on a lent GPU machine.
# That machine has torch and most of the scientific stack, but newer transformers / tokenizers /
# huggingface_hub than we pin and no mmengine, xtuner, deepspeed, sam2, hydra: those travel as wheels
# (carry [".whl"]). Pure-Python sdists (deepspeed, sam2, antlr4, ...) are built into py3 wheels here.
# Idempotent: wheels already in .whl are kept. Run from anywhere; needs the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

# Binary wheels for CPython 3.12 (the device's python3) -- pinned to what .venv runs here.
BINARY=(
  tokenizers==0.21.4 pydantic_core==2.50.5 pycocotools==2.0.10 multiprocess==0.70.16
)
# Pure-Python packages (any wheel works).
PURE=(
  transformers==4.52.4 huggingface_hub==0.36.2 accelerate==1.7.0 peft==0.15.2
  mmengine==0.10.7 addict==2.4.0 yapf==0.43.0 termcolor==3.3.0 platformdirs==4.14.8
  hydra-core==1.3.8 omegaconf==2.3.1
  pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
  xtuner==0.2.0 datasets==3.6.0 dill==0.3.8 fsspec==2025.3.0 loguru==0.7.3
)
# sdists only on the registry: built here into py3 wheels (no compiled ops: DS_BUILD_OPS=0, SAM2_BUILD_CUDA=0).
BUILD=(deepspeed==0.17.6 sam2==1.1.0 antlr4-python3-runtime==4.9.3 iopath==0.1.10)

have() { ls "$DEST"/"$(echo "${1%%==*}" | tr '-' '_')"-"${1##*==}"-*.whl >/dev/null 2>&1 \
         || ls "$DEST"/"${1%%==*}"-"${1##*==}"-*.whl >/dev/null 2>&1; }

PLAT=()
for n in 17 24 27 28 31 34; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in "${BINARY[@]}"; do
  have "$spec" && continue
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d "$DEST" "$spec"
done
for spec in "${PURE[@]}"; do
  have "$spec" && continue
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$spec"
done
for spec in "${BUILD[@]}"; do
  have "$spec" && continue
  DS_BUILD_OPS=0 SAM2_BUILD_CUDA=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec"
done
# A wheel built here is tagged for this interpreter when its setup.py declares an (optional, unbuilt)
# extension; none of these carries compiled code, so retag it for any Python 3.
for whl in "$DEST"/*-cp311-cp311-linux_x86_64.whl; do
  [ -e "$whl" ] || continue
  if unzip -l "$whl" | grep -qE '\.so$'; then echo "ERROR: $whl holds compiled code" >&2; exit 1; fi
  $PY -m wheel tags --remove --python-tag py3 --abi-tag none --platform-tag any "$whl" >/dev/null
done
echo "[fetch_device_wheels] $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
