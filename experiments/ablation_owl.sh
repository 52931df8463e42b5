#!/usr/bin/env bash
# ablation_owl: see conf/experiment/ablation_owl.yaml and experiments/README.md.
#   experiments/ablation_owl.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" ablation_owl "$@"
