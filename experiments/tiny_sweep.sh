#!/usr/bin/env bash
# The sweep machinery on the random tiny llama: four methods, seconds each (4 jobs).
#   experiments/tiny_sweep.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-basic} exec "$(dirname "$0")/launch.sh" tiny_sweep "$@"
