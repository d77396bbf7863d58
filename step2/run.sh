#!/usr/bin/env bash
# AdamBNN step 2: ReActNet-A with binary weights and activations, starting from step 1's
# step1/output/model_best.pth.tar (or --init-checkpoint PATH); same recipe, no weight decay.
#
#   DATA=/path/to/imagenet bash step2/run.sh [flags]    # e.g. --init-checkpoint my/model_best.pth.tar
#
# Writes step2/output/ (or --save): checkpoint.pth.tar, model_best.pth.tar, logs. Relaunching the
# same command resumes (mid-epoch after SIGTERM/SIGUSR1/SIGHUP/SIGINT, which save and exit 75, or 130
# for SIGINT).
# `--help` lists the flags.
#
# torchrun with one process per visible GPU (one on a machine without GPUs) and DDP (utils/launch.py).
# Environment: NPROC_PER_NODE (processes on this node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# RENDEZVOUS_TIMEOUT (several nodes: docs/training.md), PYTHON (default: the python on PATH, e.g.
# the active venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # no cd: relative paths keep working
exec "${PYTHON:-$(command -v python || command -v python3)}" -m utils.launch --step 2 "$@"
