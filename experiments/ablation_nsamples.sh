#!/usr/bin/env bash
# Ablation: calibration windows N = 1 .. 128 for SparseGPT, Wanda, GBLM-Pruner, LLaMA-7B, 50% (24 jobs).
#   experiments/ablation_nsamples.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" ablation_nsamples "$@"
