#!/usr/bin/env bash
# The demo as a sweep on this machine's CPU: SmolLM2-135M, dense and the four methods at 50% (5 jobs).
#   experiments/demo_sweep.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-basic} exec "$(dirname "$0")/launch.sh" demo_sweep "$@"
