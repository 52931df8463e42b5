#!/usr/bin/env bash
# Ablation: GBLM-Pruner's gradient scale alpha = 0, 1, 10, 100, 1000, LLaMA-7B, 50% (5 jobs).
#   experiments/ablation_scale.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" ablation_scale "$@"
