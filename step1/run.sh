#!/usr/bin/env bash
# AdamBNN step 1: ReActNet-A with binary activations and real-valued weights, trained from
# scratch with Adam and distillation from a ResNet-34 (the published recipe: utils/recipe.py).
#
#   DATA=/path/to/imagenet bash step1/run.sh [flags]    # e.g. --epochs 2 --batch_size 128
#
# Writes step1/output/ (or --save): checkpoint.pth.tar, model_best.pth.tar, logs. Relaunching the
# same command resumes.
#
# Launches one process per visible GPU (one on a machine without GPUs) with torchrun and DDP.
# Environment: NPROC_PER_NODE (processes on this node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# (several nodes: see the README), PYTHON (default: the python on PATH, e.g. the active venv).
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
exec "$PYTHON" -m utils.launch "${RDZV[@]}" --nproc_per_node "$NPROC" -m utils.train --step 1 "$@"
