#!/usr/bin/env bash
# AdamBNN step 1: ReActNet-A with binary activations and real-valued weights, trained from
# scratch with Adam and distillation from a ResNet-34 (the published recipe: utils/recipe.py).
#
#   DATA=/path/to/imagenet bash step1/run.sh [flags]    # e.g. --epochs 2 --batch_size 128
#
# Writes step1/output/ (or --save): checkpoint.pth.tar, model_best.pth.tar, logs. Relaunching the
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
exec "${PYTHON:-$(command -v python || command -v python3)}" -m utils.launch --step 1 "$@"
