#!/usr/bin/env bash
# The paper's main table on LLaMA-1 7B/13B/30B: dense, magnitude, SparseGPT, Wanda, GBLM-Pruner
# at 50% unstructured, 4:8 and 2:4 (45 jobs). 30B wants more GPUs: run it alone,
#   e.g. experiments/paper_main_llama1.sh model=llama_30b hydra.launcher.gpus_per_node=2
#   experiments/paper_main_llama1.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" paper_main_llama1 "$@"
