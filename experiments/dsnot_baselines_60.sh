#!/usr/bin/env bash
# dsnot_baselines_60: see conf/experiment/dsnot_baselines_60.yaml and experiments/README.md.
#   experiments/dsnot_baselines_60.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" dsnot_baselines_60 "$@"
