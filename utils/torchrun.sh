#!/usr/bin/env bash
# The launch both steps share: torchrun with one process per visible GPU (one without GPUs), DDP
# in utils/train.py. Called by step1/run.sh and step2/run.sh with `--step N "$@"`; see them for
# the environment variables.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
NPROC="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
if [ "${NNODES:-1}" = 1 ] && [ -z "${MASTER_ADDR:-}${MASTER_PORT:-}" ]; then
    RDZV=(--standalone)  # a single node on a free local port
else
    RDZV=(--nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
          --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
if [ "$NPROC" -gt 1 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi  # as torchrun would
# The repository on the module path (no cd: relative --data and --save paths keep working).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m utils.launch "${RDZV[@]}" --nproc_per_node "$NPROC" -m utils.train "$@"
