#!/usr/bin/env bash
# Sparsity sweep: magnitude, Wanda, SparseGPT, GBLM-Pruner at 10% .. 80% unstructured, LLaMA-7B (32 jobs).
#   experiments/paper_sparsity_sweep.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" paper_sparsity_sweep "$@"
