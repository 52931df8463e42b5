#!/usr/bin/env bash
# docs/results.md: conf/experiment/results_smollm2.yaml, launched per sparsity and family into one
# resumable sweep dir, then the report (docs/results/). Relaunch to resume where it stopped.
#   experiments/results_smollm2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${SWEEP_DIR:-outputs/sweeps/results_smollm2}
sweep() { "$PY" -m gblm -m experiment=results_smollm2 "hydra.sweep.dir=$DIR" "$@" || status=1; }
status=0
began=$(date +%s)
sweep method=dense sparsity.allocator=uniform
for ratio in 0.5 0.7; do
  sweep sparsity.ratio=$ratio
  sweep sparsity.ratio=$ratio method=dsnot method.initial=wanda,gblm sparsity.allocator=uniform
done
# 2:4: OWL's N:M variant with the published Lambda for N:M (N spans Lambda: blocks at 1:4..3:4)
sweep sparsity=nm_2_4 sparsity.lmbda=2
sweep sparsity=nm_2_4 method=dsnot method.initial=wanda,gblm sparsity.allocator=uniform
echo "sweeps: $(( $(date +%s) - began )) s of wall time in this launch"
"$PY" -m gblm.report "$DIR" --out docs/results
exit $status
