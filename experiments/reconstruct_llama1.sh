#!/usr/bin/env bash
# reconstruct_llama1: see conf/experiment/reconstruct_llama1.yaml and experiments/README.md.
#   experiments/reconstruct_llama1.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
# Five launches into one resumable sweep dir; relaunch to resume where it stopped.
export LAUNCHER=${LAUNCHER:-slurm} SWEEP_DIR=${SWEEP_DIR:-outputs/sweeps/reconstruct_llama1}
launch() { "$(dirname "$0")/launch.sh" reconstruct_llama1 "$@" || status=1; }
status=0
launch "$@"                                                             # the factorial, 24 jobs
launch sparsity=nm_2_4 sparsity.ratio=0.5 "$@"                          # its 2:4 column, 6 jobs
launch method=dense reconstruct=none sparsity.ratio=0.5 "$@"            # the dense row
launch method=sparsegpt,admm reconstruct=none sparsity.ratio=0.5,0.6,0.7,0.8 "$@"
launch method=sparsegpt,admm reconstruct=none sparsity=nm_2_4 sparsity.ratio=0.5 "$@"
exit $status
