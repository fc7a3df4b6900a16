#!/usr/bin/env bash
# Launch a tool on NUM_GPUS processes per node with torchrun.
#
#   bash tools/dist.sh train CONFIG NUM_GPUS [extra args for tools/train.py]
#
# Environment knobs (defaults):
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (28500 + RANDOM % 2000)
#   DEEPSPEED  deepspeed_zero2 when NVIDIA GPUs are present, else none (CPU: gloo, no DeepSpeed)
#   OMP_NUM_THREADS  1 (also on CPU: on a busy 2-core machine 2 threads were >10x slower per iteration;
#                    raise it on a dedicated many-core CPU machine)
#   PYTHON     .venv/bin/python of this repo if present, else python
# NUM_GPUS is the number of processes per node (CPU processes on a machine without GPUs).
set -euo pipefail

USAGE="usage: bash tools/dist.sh TOOL CONFIG NUM_GPUS [extra args]   (TOOL: train -> tools/train.py;
       bash tools/dist.sh train CONFIG 1 --help lists the training options)"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "$USAGE"
    exit 0
fi
if [ $# -lt 3 ]; then
    echo "$USAGE" >&2
    exit 2
fi
TOOL=$1
CONFIG=$2
GPUS=$3
shift 3

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/tools/${TOOL}.py"
if [ ! -f "$SCRIPT" ]; then
    echo "dist.sh: no tool named '$TOOL' ($SCRIPT not found)" >&2
    exit 2
fi
if [ ! -f "$CONFIG" ]; then
    echo "dist.sh: config not found: $CONFIG" >&2
    exit 2
fi
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "dist.sh: NUM_GPUS must be a positive integer, got '$GPUS'" >&2
    exit 2
fi

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi

HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    HAS_GPU=1
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PORT=${PORT:-$((28500 + RANDOM % 2000))}
if [ "$HAS_GPU" = 1 ]; then
    DEEPSPEED=${DEEPSPEED:-deepspeed_zero2}
else
    DEEPSPEED=${DEEPSPEED:-none}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    "$SCRIPT" "$CONFIG" --launcher pytorch --deepspeed "$DEEPSPEED" "$@"
