#!/usr/bin/env bash
# The paper's main table on LLaMA-2 7B/13B/70B: dense, magnitude, SparseGPT, Wanda, GBLM-Pruner
# at 50% unstructured, 4:8 and 2:4 (45 jobs). 70B (device_map: auto) wants 4 GPUs: run it alone,
#   e.g. experiments/paper_main_llama2.sh model=llama2_70b hydra.launcher.gpus_per_node=4 hydra.launcher.mem_gb=256
#   experiments/paper_main_llama2.sh [overrides ...]   (LAUNCHER=... SWEEP_DIR=... as in launch.sh)
LAUNCHER=${LAUNCHER:-slurm} exec "$(dirname "$0")/launch.sh" paper_main_llama2 "$@"
