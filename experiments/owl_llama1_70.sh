#!/usr/bin/env bash
# owl_llama1_70: see conf/experiment/owl_llama1_70.yaml and experiments/README.md.
#   experiments/owl_llama1_70.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" owl_llama1_70 "$@"
