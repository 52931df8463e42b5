#!/usr/bin/env bash
# Ablation: calibration dataset c4 / wikitext2 / austen / kjv for Wanda and GBLM-Pruner, LLaMA-7B, 50% (8 jobs).
#   experiments/ablation_calibration.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" ablation_calibration "$@"
