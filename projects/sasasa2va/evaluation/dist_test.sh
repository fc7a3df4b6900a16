#!/usr/bin/env bash
# Distributed evaluation launcher (spec evaluation.md §4.1).
#   dist_test.sh SCRIPT HF_DIR NUM_GPUS [ARGS...]
# runs NUM_GPUS processes of `SCRIPT HF_DIR --launcher pytorch ARGS...` with torchrun (nccl on CUDA,
# gloo on a CPU-only machine). Knobs: NNODES (1), NODE_RANK (0), PORT (28500+RANDOM%2000),
# MASTER_ADDR (127.0.0.1), TORCHRUN (launcher; default .venv/bin/torchrun, then torchrun on PATH,
# then $PYTHON -m torch.distributed.run).
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 SCRIPT HF_DIR NUM_GPUS [ARGS...]" >&2
    exit 2
fi
SCRIPT=$1
HF_DIR=$2
NUM_GPUS=$3
shift 3
if ! [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "dist_test.sh: NUM_GPUS must be a positive integer (processes per node), got '$NUM_GPUS'" >&2
    exit 2
fi
if [ ! -f "$SCRIPT" ]; then
    echo "dist_test.sh: evaluation script not found: $SCRIPT" >&2
    exit 2
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-$((28500 + RANDOM % 2000))}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

if [ -n "${TORCHRUN:-}" ]; then
    LAUNCH=("${TORCHRUN}")
elif [ -x "${REPO_ROOT}/.venv/bin/torchrun" ]; then
    LAUNCH=("${REPO_ROOT}/.venv/bin/torchrun")
elif command -v torchrun >/dev/null 2>&1; then
    LAUNCH=(torchrun)
else
    LAUNCH=("${PYTHON:-python}" -m torch.distributed.run)
fi

exec "${LAUNCH[@]}" \
    --nnodes="${NNODES}" \
    --node_rank="${NODE_RANK}" \
    --master_addr="${MASTER_ADDR}" \
    --master_port="${PORT}" \
    --nproc_per_node="${NUM_GPUS}" \
    "${SCRIPT}" "${HF_DIR}" --launcher pytorch "$@"
