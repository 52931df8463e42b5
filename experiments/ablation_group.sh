#!/usr/bin/env bash
# Ablation: GBLM-Pruner's comparison group row vs layer, LLaMA-7B, 50% (2 jobs).
#   experiments/ablation_group.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" ablation_group "$@"
