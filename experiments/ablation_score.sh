#!/usr/bin/env bash
# Ablation: GBLM-Pruner's score: combined, gradient only, activation only, LLaMA-7B, 50% (3 jobs).
#   experiments/ablation_score.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" ablation_score "$@"
