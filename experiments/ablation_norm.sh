#!/usr/bin/env bash
# Ablation: GBLM-Pruner's gradient norm l1 vs l2, LLaMA-7B, 50% (2 jobs).
#   experiments/ablation_norm.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" ablation_norm "$@"
