#!/usr/bin/env bash
# dsnot_llama_60: see conf/experiment/dsnot_llama_60.yaml and experiments/README.md.
#   experiments/dsnot_llama_60.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" dsnot_llama_60 "$@"
